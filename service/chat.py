"""Chat templates and special tokens: what a decoder reward model must see, and warnings when it does not.

Bundles exported from a tokenizer with a chat template carry it (`TextFormat.chat_template`). This
module renders `messages` with it (jinja2, sandboxed, with the helpers Hugging Face templates expect),
turns raw templated text (what OpenRLHF, verl and TEI clients send) into the (prompt, response) pair
the encoder takes, and checks every encoded item for the three classic mistakes:

  * doubled_bos: the text already starts with the BOS the tokenizer adds (a template that writes
    `{{ bos_token }}` tokenized with special tokens on), so the model sees two;
  * missing_eos / doubled_eos: the token the model reads its reward from is not the EOS it was trained
    with (a generation cut at max length has no EOS; a text ending in EOS gets a second one appended);
  * response_truncated: the input was over max_length and the response itself lost tokens, so the
    reward is read from a response missing its beginning.

Turn forgery (issue 24): content is text. A control token's text in a message (`<|im_end|>`, `[SEP]`) is
read as plain characters (flagged `special_token_in_content`; or refused), the template's own stay tokens
(the rendering is a service.encoding.Templated marking the content). Templated text sent whole (compat
routes) keeps its tokens; a response there that opens a new turn is flagged `forged_turn`.

The special-token strings (bos/eos/pad) come from the bundle's own tokenizer_config.json, which is in
the checksummed bundle; the token ids the encoder really adds come from the tokenizer's post-processor.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any, Literal, Sequence

from service.data import ASSISTANT_MARK, render_messages
from service.encoding import SPECIAL_TOKEN_IN_CONTENT, Encoded, Templated, TextEncoder, TextFormat

log = logging.getLogger("rewardserve.chat")

_PROBE_USER = "RSPROBEUSERTURN"
_PROBE_ASSISTANT = "RSPROBEASSISTANTTURN"
FORGED_TURN = "forged_turn"


WARNINGS = {SPECIAL_TOKEN_IN_CONTENT: f"{SPECIAL_TOKEN_IN_CONTENT}: the content holds a control token's text (e.g. "
            "'<|im_end|>', an EOS); it was read as plain characters, not as the token",
            FORGED_TURN: f"{FORGED_TURN}: the response opens a new chat turn with the template's control tokens "
            "after its assistant header (a forged turn); scored as sent"}


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own raise_exception, or a jinja error)."""


class ContentRefused(ChatTemplateError):
    """special_tokens_in_content="refuse" and a message's content holds a control token's text."""


def _compile(source: str):
    """Compile a Hugging Face chat template in a sandbox, with the globals such templates use."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for training masks; rendering keeps it as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # templates keep loop state in namespace(); refuse dunder/private names so nothing reaches internals
        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: dt.datetime.now().strftime(fmt))
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may hold AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_special_tokens(bundle: str | Path | None) -> dict[str, str]:
    """bos/eos/pad/unk token strings from the bundle's tokenizer_config.json (empty if it has none)."""
    if bundle is None:
        return {}
    path = Path(bundle) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token"):
        text = _token_text(config.get(name))
        if text is not None:
            out[name] = text
    return out


@dataclasses.dataclass
class Pair:
    """What one input becomes: the two texts the encoder takes."""

    prompt: str
    response: str


class ChatFormat:
    """A bundle's chat template + special tokens: render messages, split templated text, check encodings."""

    def __init__(self, fmt: TextFormat, encoder: TextEncoder, special_tokens: dict[str, str] | None = None,
                 special_tokens_in_content: Literal["text", "refuse"] = "text"):
        self.fmt = fmt
        self.encoder = encoder
        self.controls = encoder.controls
        self.refuse_content = special_tokens_in_content == "refuse"
        self.turn_tokens: set[str] = set()  # control tokens at the template's turn boundaries (forged_turn)
        tokenizer = encoder.tokenizer
        self.special_tokens = dict(special_tokens or {})
        if fmt.eos_token:
            self.special_tokens["eos_token"] = fmt.eos_token
        # The ids the encoder puts before the text (Llama: BOS; BERT: [CLS]; Qwen, GPT-2: nothing).
        self.bos_ids: list[int] = list(encoder.template.specials[0][0])
        self.bos_text = "".join(tokenizer.id_to_token(i) or "" for i in self.bos_ids) or None
        self.eos_text = self.special_tokens.get("eos_token")
        self.eos_id = tokenizer.token_to_id(self.eos_text) if self.eos_text else None
        pad = tokenizer.id_to_token(fmt.pad_token_id)
        self.pad_text = pad if pad and pad == self.special_tokens.get("pad_token") else None
        self.template = None
        self.template_error: str | None = None
        self.assistant_marker: str | None = None  # text that opens an assistant turn ("<|im_start|>assistant\n")
        self.eos_tail: str | None = None  # what the template writes after an assistant message, from EOS on
        if fmt.chat_template:
            try:
                self.template = _compile(fmt.chat_template)
            except Exception as exc:  # a bundle whose template does not compile still serves raw text
                self.template_error = f"the bundle's chat template does not compile: {exc}"
                log.error("%s; 'messages' input will be refused", self.template_error)
            else:
                self._probe()

    @classmethod
    def from_bundle(cls, bundle: str | Path | None, fmt: TextFormat, encoder: TextEncoder,
                    special_tokens_in_content: Literal["text", "refuse"] = "text") -> "ChatFormat":
        return cls(fmt, encoder, read_special_tokens(bundle), special_tokens_in_content)

    # ---- rendering

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if self.template is None:
            raise ChatTemplateError(self.template_error or "this bundle has no chat template")
        context = {k: v for k, v in self.special_tokens.items()}
        try:
            return self.template.render(messages=[dict(m) for m in messages],
                                        add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                                        **context)
        except Exception as exc:
            raise ChatTemplateError(f"chat template failed on these messages: {exc}") from None

    def _probe(self) -> None:
        """Learn the assistant-turn opener and the end-of-turn text from two probe renderings."""
        user = [{"role": "user", "content": _PROBE_USER}]
        try:
            base = self.render(user)
            opened = self.render(user, add_generation_prompt=True)
            full = self.render(user + [{"role": "assistant", "content": _PROBE_ASSISTANT}])
        except ChatTemplateError as exc:
            log.warning("chat template probe failed (%s); templated text is split at %r only", exc, ASSISTANT_MARK)
            return
        if opened.startswith(base) and opened[len(base):].strip():
            self.assistant_marker = opened[len(base):]
        if _PROBE_ASSISTANT in full:
            after = full.split(_PROBE_ASSISTANT, 1)[1]
            if self.eos_text and self.eos_text in after:
                self.eos_tail = after[after.index(self.eos_text):]
        self._probe_turn_tokens(user)

    def _probe_turn_tokens(self, user: list[dict]) -> None:
        """The control tokens that end an assistant turn and open the next ("<|im_end|>\n<|im_start|>user\n")
        or open an assistant turn: what a forged turn in a response is made of (opens_turn)."""
        try:
            more = self.render(user + [{"role": "assistant", "content": _PROBE_ASSISTANT}] + user)
        except ChatTemplateError:
            more = ""
        boundary = more.split(_PROBE_ASSISTANT, 1)[-1].split(_PROBE_USER, 1)[0] if _PROBE_ASSISTANT in more else ""
        for text in (boundary, self.assistant_marker or "", self.eos_tail or ""):
            self.turn_tokens.update(text[a:b] for a, b in self.controls.find(text))

    @property
    def has_template(self) -> bool:
        return self.template is not None

    def messages_to_pair(self, messages: Sequence[dict]) -> Pair:
        """A chat whose last message is the assistant's → (prompt, response) as the model was trained.

        With a template: the whole chat is rendered (exactly what apply_chat_template writes) and cut
        where the last assistant turn's content starts; a BOS the template writes is dropped because the
        tokenizer adds its own (the text then tokenizes like apply_chat_template(tokenize=True))."""
        if not self.fmt.chat_template:  # the trainer's own dialogue rendering (service/data.py: parse_record)
            self._refuse(messages)  # plain str: every control token's text in it is read as text
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            return Pair(render_messages(messages[:-1]) + ASSISTANT_MARK, messages[-1]["content"].strip())
        messages = [{**m, "role": "user" if m["role"] == "human" else m["role"]} for m in messages]
        protected, table = self._protect(messages)
        full = self.render(protected)
        head = self.render(protected[:-1], add_generation_prompt=True)
        if full.startswith(head):
            pair = Pair(head, full[len(head):])
        else:  # the template rewrites earlier turns (e.g. drops reasoning): cut at the last assistant opener
            pair = self.split(full)
        pair = self._strip_bos(pair)
        return Pair(_restore(pair.prompt, table), _restore(pair.response, table))

    def render_to_pair(self, messages: Sequence[dict]) -> Pair:
        """A chat not ending on the assistant's turn, scored as the template renders it (content stays text)."""
        protected, table = self._protect(messages)
        pair = self.prepare_text(self.render(protected))
        return Pair(_restore(pair.prompt, table), _restore(pair.response, table, pair.response.forged_turn))

    def _refuse(self, messages: Sequence[dict]) -> None:
        if not self.refuse_content:
            return
        for i, m in enumerate(messages):
            content = m.get("content")
            for a, b in self.controls.find(content)[:1] if isinstance(content, str) else []:
                raise ContentRefused(f"messages.{i}.content holds the text of the control token {content[a:b]!r}; "
                                     "this server refuses it in content (special_tokens_in_content=refuse)")

    def _protect(self, messages: Sequence[dict]) -> tuple[list[dict], dict[str, str]]:
        """The messages with each control token's text in their content replaced by a unique placeholder
        (private-use characters no template alters), and placeholder → text: rendered, the placeholders mark
        exactly where content put control-token text (_restore)."""
        self._refuse(messages)
        out, table, nonce = [], {}, secrets.token_hex(4)
        for m in messages:
            content = m.get("content")
            found = self.controls.find(content) if isinstance(content, str) else []
            for a, b in reversed(found):
                key = f"\ue000{nonce}{len(table)}\ue001"
                table[key] = content[a:b]
                content = content[:a] + key + content[b:]
            out.append({**m, "content": content} if found else dict(m))
        return out, table

    # ---- raw templated text (OpenRLHF query, vLLM input, TEI inputs)

    def split(self, text: str, prompt: str | None = None) -> Pair:
        """Where the response starts in prompt+response text: after `prompt` if the text starts with it,
        else after the last assistant-turn opener of the chat template, else after the last
        '\\n\\nAssistant:', else the whole text is the response (empty prompt)."""
        if prompt:
            for candidate in (text, self._without_bos(text)):
                if candidate.startswith(prompt):
                    return Pair(text[: len(text) - len(candidate) + len(prompt)], candidate[len(prompt):])
        for marker in (self.assistant_marker, ASSISTANT_MARK):
            if marker:
                cut = text.rfind(marker)
                if cut >= 0:
                    end = cut + len(marker)
                    return Pair(text[:end], text[end:])
        return Pair("", text)

    def prepare_text(self, text: str, prompt: str | None = None) -> Pair:
        """Templated text sent with its special tokens kept → the pair the encoder takes.

        Padding tokens around the text are dropped; a leading BOS is dropped when the tokenizer adds
        one itself; with append_eos a trailing EOS is dropped because the encoder appends it."""
        if self.pad_text and self.pad_text not in (self.bos_text, self.eos_text):
            while text.startswith(self.pad_text):
                text = text[len(self.pad_text):]
            while text.endswith(self.pad_text):
                text = text[: -len(self.pad_text)]
        if self.fmt.append_eos and self.eos_text:
            stripped = text.rstrip()
            if stripped.endswith(self.eos_text):
                text = stripped[: -len(self.eos_text)]
        pair = self._strip_bos(self.split(text, prompt))
        forged = bool(pair.prompt) and self.opens_turn(pair.response)  # no prompt: no assistant header found
        return Pair(Templated(pair.prompt), Templated(pair.response, forged_turn=forged))

    def opens_turn(self, response: str) -> bool:
        """Whether a turn token of the template (what ends a turn or opens one: `<|im_end|>`, `<|im_start|>`)
        stands in the response before its last text: the response closed its turn and went on (a forged
        turn). A run of control tokens at its very end is the turn's own end (EOS, "<|im_end|>\n")."""
        found, end = self.controls.find(response), len(response)
        for a, b in reversed(found):  # the trailing run of control tokens (and whitespace) is the turn's own end
            if response[b:end].strip():
                break
            end = a
        return any(a < len(response[:end].rstrip()) and response[a:b] in self.turn_tokens for a, b in found)

    def _without_bos(self, text: str) -> str:
        if self.bos_text and text.startswith(self.bos_text):
            return text[len(self.bos_text):]
        return text

    def _strip_bos(self, pair: Pair) -> Pair:
        if pair.prompt:
            return Pair(self._without_bos(pair.prompt), pair.response)
        return Pair("", self._without_bos(pair.response))

    # ---- checks on what the model really sees

    def check(self, encoded: Encoded, response: str) -> list[str]:
        """Warnings for one encoded item (empty when all is well)."""
        ids, out = encoded.ids, []
        k = len(self.bos_ids)
        if k and ids[:k] == self.bos_ids and ids[k:2 * k] == self.bos_ids:
            out.append(f"doubled_bos: the text starts with {self.bos_text!r} and the tokenizer adds it too, so the "
                       "model sees it twice; send the text without it")
        if self.fmt.append_eos and self.eos_id is not None:
            if len(ids) >= 2 and ids[-1] == ids[-2] == self.eos_id:
                out.append(f"doubled_eos: the text ends with {self.eos_text!r} and the server appends it too; send "
                           "the text without it")
        elif self.eos_tail and self.eos_tail.strip():
            tail = self.eos_tail.strip()  # in content (a plain str) its text is no token: missing too
            if not isinstance(response, Templated) or not response.rstrip().endswith(tail):
                out.append(f"missing_eos: the model reads its reward after {tail!r} (the chat template's end of "
                           "an assistant turn) but the response does not end with it (a generation cut at max "
                           "length, or untemplated text); send the templated text or use 'messages'")
        budget = self.encoder.budget
        if encoded.truncated and encoded.response_tokens > budget:
            out.append(f"response_truncated: the response alone is {encoded.response_tokens} tokens, over the "
                       f"{budget} the model's max_length of {self.fmt.max_length} leaves; only its last {budget} "
                       "were scored")
        return out

    def annotate(self, encoded: Encoded, response: str) -> Encoded:
        """`encoded` with its warnings and flags (special_token_in_content from the encoder, forged_turn)."""
        warnings, flags = self.check(encoded, response), list(encoded.flags)
        if getattr(response, "forged_turn", False):
            flags.append(FORGED_TURN)
        warnings += [WARNINGS[f] for f in flags if f in WARNINGS]
        if not warnings:
            return encoded
        return dataclasses.replace(encoded, warnings=tuple(warnings), flags=tuple(flags))

    def refusal(self, prompt: str, response: str) -> tuple[str, str] | None:
        """With special_tokens_in_content="refuse": ("prompt" or "response", why) for the first whose content
        holds a control token's text (the engine answers 422 naming that field); else None."""
        if not self.refuse_content:
            return None
        for part, text in (("prompt", prompt), ("response", response)):
            found = self.controls.in_content(text)
            if found:
                a, b = found[0]
                return part, (f"holds the text of the control token {text[a:b]!r}; this server refuses it in "
                              "content (special_tokens_in_content=refuse)")
        return None


def _restore(text: str, table: dict[str, str], forged_turn: bool = False) -> Templated:
    """Rendered text with ChatFormat._protect's placeholders put back, their spans marked plain (content)."""
    if not table:
        return Templated(text, forged_turn=forged_turn)
    out, spans, pos = "", [], 0
    for m in re.finditer("\ue000[0-9a-f]{8}[0-9]+\ue001", text):
        original = table.get(m.group())
        if original is not None:
            out += text[pos:m.start()]
            spans.append((len(out), len(out) + len(original)))
            out, pos = out + original, m.end()
    return Templated(out + text[pos:], spans, forged_turn)
