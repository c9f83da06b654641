"""Turn (prompt, response) pairs into model inputs, identically at training, export and serve time.

One module owns the join rule and the truncation policy so that the trainer, the parity check and
the service can never disagree about what the model saw. It depends on the `tokenizers` library only
(no torch, no transformers), because the ONNX serving path must stay torch-free.

Truncation policy ("keep_response_end"): the reward is read from the response, and for decoder
models from its last token, so when a pair is too long the prompt loses tokens from the left first;
if the response alone is still too long it keeps its last tokens.

Control tokens (issue 24, turn forgery): a `str` given to the encoder is *content*: the text of a control
token in it (BOS/EOS, `<|im_start|>`, `[SEP]`: the tokenizer's added tokens marked special) is encoded
as its plain characters, so a response cannot end its turn and forge a new one by writing `<|im_end|>`.
Text that a chat template wrote (service/chat.py) arrives as `Templated`, whose control tokens are the
template's own and stay control tokens, except in the spans its content filled. Text without any control
token's text in its content is tokenized exactly as before, in one batch call.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel
from tokenizers import Tokenizer

TRUNCATION_POLICY = "keep_response_end"
# A token covers at least one character, and real text averages ~4: cutting a text to this many
# characters per allowed token before tokenizing keeps tokenization of a 1 M-character input bounded
# without changing which tokens survive.
CHARS_PER_TOKEN_BOUND = 32


class TextFormat(BaseModel):
    """How a pair becomes one token sequence; stored in the bundle manifest."""

    join: Literal["pair", "concat"] = "pair"
    """pair: the tokenizer's own two-segment template ([CLS] p [SEP] r [SEP] for BERT);
    concat: prompt tokens then response tokens as one sequence (decoder models)."""
    max_length: int = 256
    append_eos: bool = False
    """concat only: append the EOS token so a last-token reward head reads a fixed token."""
    eos_token: str | None = None
    pad_token_id: int = 0
    uses_token_type_ids: bool = True
    truncation: Literal["keep_response_end"] = TRUNCATION_POLICY
    chat_template: str | None = None
    """Jinja chat template of decoder reward models, used for `messages` input."""


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    type_ids: list[int]
    truncated: bool
    """The start was cut (see `shareable`): the prompt's first tokens, or the response's when the prompt
    is gone, or the text's first characters."""
    response_tokens: int = 0
    """Tokens of the response alone before any cut (of its last max_length × 32 characters): over the
    encoder's budget means the response itself lost its beginning."""
    warnings: tuple[str, ...] = ()
    """Problems with what the model sees (doubled BOS, missing EOS, response cut); see service/chat.py."""
    flags: tuple[str, ...] = ()
    """Machine-readable marks the engine appends to ScoreResult.flags and counts in the metrics:
    "special_token_in_content" (a control token's text inside content, encoded as plain text),
    "forged_turn" (templated text whose response opens a new chat turn); see service/chat.py."""

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SharedPrefix:
    """Items of one best-of-N request that start with the same `prefix` tokens (the prompt): run as one
    unit, the runtime computes those tokens once (TransformersRuntime.run_shared)."""

    items: tuple[Encoded, ...]
    prefix: int

    @property
    def n_tokens(self) -> int:
        """The tokens computed: the prefix once plus every item's rest."""
        return self.prefix + sum(e.n_tokens - self.prefix for e in self.items)


def reward_token(ids: Sequence[int], pad_token_id: int) -> int:
    """Index of the token a decoder's reward is read from: the rightmost that is not the pad id (-1: none).
    With OpenRLHF's last-attended pooling the reward token is the last one, never before this."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i
    return -1


def group_prefix(items: Sequence[Encoded], pad_token_id: int) -> int:
    """The leading tokens all `items` have in common, stopped before each item's reward token (so every
    item keeps the token its reward is read from). For one item: everything before its reward token (what a
    later item of its group can reuse from the prefix cache)."""
    n = max(0, min(reward_token(e.ids, pad_token_id) for e in items))
    first = np.asarray(items[0].ids[:n], dtype=np.int64)
    for e in items[1:]:
        differ = np.flatnonzero(first[:n] != np.asarray(e.ids[:n], dtype=np.int64))
        n = int(differ[0]) if len(differ) else n
    return n


def shared_prefix(items: Sequence[Encoded], minimum: int, pad_token_id: int) -> SharedPrefix | None:
    """The items as one SharedPrefix when they are several and all start with at least `minimum` equal
    tokens; the prefix stops before the token each item's reward is read from (a decoder head reads the
    rightmost token that is not the pad id, which may be the EOS), so every item keeps it; else None."""
    if len(items) < 2:
        return None
    n = group_prefix(items, pad_token_id)
    return SharedPrefix(tuple(items), n) if n >= minimum else None


def shareable(item: Encoded, minimum: int) -> bool:
    """Whether an item may share its leading tokens with other requests' items (prefix sharing across
    requests, service/batcher.py): long enough, and not truncated. Truncation here always cuts the start
    (keep_response_end drops the prompt's first tokens, then the response's, and an over-long text is cut
    to its last characters), so a truncated item no longer starts with its prompt: equal leading ids with
    another item would be a coincidence of two cuts, and it is scored unshared (exact either way)."""
    return minimum > 0 and not item.truncated and item.n_tokens > minimum


SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"


class Templated(str):
    """Text a chat template wrote (or templated text sent to the compatibility routes): its control tokens
    are the template's own and are encoded as control tokens, except those in the `plain` character spans,
    which came from message content and are encoded as their plain characters. `forged_turn`: set by
    ChatFormat.prepare_text on a response that opens a new chat turn.

    A str subclass because it must travel unchanged from the chat format through the routes' and the
    engine's (prompt, response) items to the encoder, which alone decides token ids; a plain `str` is
    content throughout."""

    plain: tuple[tuple[int, int], ...]
    forged_turn: bool

    def __new__(cls, text: str, plain: Sequence[tuple[int, int]] = (), forged_turn: bool = False) -> "Templated":
        self = super().__new__(cls, text)
        self.plain = tuple(plain)
        self.forged_turn = forged_turn
        return self

    def tail(self, start: int) -> "Templated":
        """self[start:] with its plain spans moved along (a span cut in two keeps its rest)."""
        spans = [(max(a, start) - start, b - start) for a, b in self.plain if b > start]
        return Templated(str.__getitem__(self, slice(start, None)), spans, self.forged_turn)


class ControlTokens:
    """The tokenizer's control tokens (added tokens marked special) and the encoding of content that holds
    their text: split at the control tokens that stay (the template's), tokenize each piece between them
    with a copy of the tokenizer that reads special tokens as text. That is what the tokenizer does itself
    (it splits at added tokens first, then tokenizes each piece alone), so the content's control-token text
    is tokenized exactly as the same characters would be if they were not a token's text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.ids = {t.content: i for i, t in added.items() if t.special and t.content}
        texts = sorted(self.ids, key=len, reverse=True)  # the longest first: "<|im_end|>" before "<|im"
        self.pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._plain: Tokenizer | None = None
        self._lock = threading.Lock()

    def find(self, text: str) -> list[tuple[int, int]]:
        """Character spans of every control token's text in `text`."""
        if self.pattern is None or self.pattern.search(text) is None:  # ~0.5 µs a typical text: <1 % of tokenizing
            return []
        return [m.span() for m in self.pattern.finditer(text)]

    def in_content(self, text: str) -> list[tuple[int, int]]:
        """The spans of control-token text in the content of `text` (all of a plain str)."""
        found = self.find(text)
        if not found or not isinstance(text, Templated):
            return found
        return [(a, b) for a, b in found if any(a < pb and pa < b for pa, pb in text.plain)]

    def plain_tokenizer(self) -> Tokenizer:
        with self._lock:
            if self._plain is None:
                plain = Tokenizer.from_str(self.tokenizer.to_str())
                plain.encode_special_tokens = True  # special tokens' text is tokenized like any text
                self._plain = plain
            return self._plain

    def encode(self, text: str, content: list[tuple[int, int]]) -> list[int]:
        """Token ids of `text` whose control-token text in `content` spans is plain characters."""
        plain = set(content)
        kept = [(a, b) for a, b in self.find(text) if (a, b) not in plain]
        pieces, ids_between, start = [], [], 0
        for a, b in kept:
            pieces.append(text[start:a])
            ids_between.append(self.ids[text[a:b]])
            start = b
        pieces.append(text[start:])
        encodings = self.plain_tokenizer().encode_batch(pieces, add_special_tokens=False)
        ids: list[int] = []
        for i, enc in enumerate(encodings):
            ids += enc.ids
            if i < len(ids_between):
                ids.append(ids_between[i])
        return ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json with the file's own padding/truncation switched off: we do both."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, fmt: TextFormat):
        self.tokenizer = tokenizer
        self.fmt = fmt
        if fmt.join == "pair":
            self.n_special = tokenizer.num_special_tokens_to_add(is_pair=True)
        else:
            self.n_special = tokenizer.num_special_tokens_to_add(is_pair=False)
        self.eos_id: int | None = None
        if fmt.join == "concat" and fmt.append_eos:
            if fmt.eos_token is None or tokenizer.token_to_id(fmt.eos_token) is None:
                raise ValueError(f"append_eos needs an eos_token known to the tokenizer, got {fmt.eos_token!r}")
            self.eos_id = tokenizer.token_to_id(fmt.eos_token)
            self.n_special += 1
        self.template = SpecialTokenTemplate(tokenizer, pair=fmt.join == "pair")
        self.controls = ControlTokens(tokenizer)
        self.budget = fmt.max_length - self.n_special
        if self.budget < 2:
            raise ValueError(f"max_length {fmt.max_length} leaves no room for text")
        self.char_limit = fmt.max_length * CHARS_PER_TOKEN_BOUND

    @classmethod
    def from_dir(cls, directory: str | Path, fmt: TextFormat) -> "TextEncoder":
        return cls(load_tokenizer(Path(directory) / "tokenizer.json"), fmt)

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool], list[bool]]:
        """Token ids of each text, whether its start was cut, whether its content held control-token text."""
        cut = [len(t) > self.char_limit for t in texts]
        clipped = [_clip(t, self.char_limit) if c else t for t, c in zip(texts, cut)]
        content = [self.controls.in_content(t) for t in clipped]
        ids: list[list[int]] = [[]] * len(texts)
        usual = [i for i, spans in enumerate(content) if not spans]  # the common case: one batch call, as ever
        encodings = self.tokenizer.encode_batch([clipped[i] for i in usual], add_special_tokens=False)
        for i, enc in zip(usual, encodings):
            ids[i] = enc.ids
        for i, spans in enumerate(content):
            if spans:
                ids[i] = self.controls.encode(clipped[i], spans)
        return ids, cut, [bool(spans) for spans in content]

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        return self._join(*self._tokenize(prompts), responses)

    def encode_shared_prompt(self, prompt: str, responses: Sequence[str]) -> list[Encoded]:
        """Best-of-N: tokenize the prompt once and join it with every candidate."""
        [ids], [cut], [special] = self._tokenize([prompt])
        n = len(responses)
        return self._join([ids] * n, [cut] * n, [special] * n, responses)

    def _join(self, prompt_ids: list[list[int]], prompt_cut: list[bool], prompt_special: list[bool],
              responses: Sequence[str]) -> list[Encoded]:
        response_ids, response_cut, response_special = self._tokenize(responses)
        return [self._join_one(p, r, p_cut or r_cut, p_special or r_special) for p, r, p_cut, r_cut, p_special,
                r_special in zip(prompt_ids, response_ids, prompt_cut, response_cut, prompt_special, response_special)]

    def _join_one(self, p_ids: list[int], r_ids: list[int], cut: bool, special: bool) -> Encoded:
        response_tokens = len(r_ids)
        truncated = cut
        if len(r_ids) > self.budget:
            r_ids = r_ids[-self.budget:]
            truncated = True
        room = self.budget - len(r_ids)
        if len(p_ids) > room:
            p_ids = p_ids[len(p_ids) - room:] if room > 0 else []
            truncated = True
        if self.fmt.join == "pair":
            ids, type_ids = self.template.fill([p_ids, r_ids])
        else:
            ids, type_ids = self.template.fill([p_ids + r_ids])
            if self.eos_id is not None:
                ids.append(self.eos_id)
                type_ids.append(type_ids[-1] if type_ids else 0)
        return Encoded(ids, type_ids, truncated, response_tokens, flags=(SPECIAL_TOKEN_IN_CONTENT,) if special else ())

    def pad(self, batch: Sequence[Encoded], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Right-pad to the longest item (or `pad_to`); returns int64 arrays named as the model's inputs."""
        width = max(pad_to or 0, max(e.n_tokens for e in batch))
        ids = np.full((len(batch), width), self.fmt.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        for i, e in enumerate(batch):
            n = e.n_tokens
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            types[i, :n] = e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask}
        if self.fmt.uses_token_type_ids:
            arrays["token_type_ids"] = types
        return arrays


def _clip(text: str, limit: int) -> str:
    """The last `limit` characters (a Templated keeps its plain spans)."""
    return text.tail(len(text) - limit) if isinstance(text, Templated) else text[-limit:]


class SpecialTokenTemplate:
    """Where the tokenizer's post-processor puts its special tokens around one or two segments.

    Learned once by encoding two marker segments and reading `sequence_ids`, so every
    tokenizer.json template (BERT, RoBERTa, Llama BOS, none) is honoured without re-implementing it,
    and joining a pre-tokenized prompt with many responses is plain list work.
    """

    def __init__(self, tokenizer: Tokenizer, pair: bool):
        # (post_process() drops the first segment's sequence ids; encode() keeps them.)
        merged = tokenizer.encode("a", "b") if pair else tokenizer.encode("a")
        # specials[k] is the run of special tokens (ids, type ids) before segment k; the last run
        # follows the final segment.
        self.specials: list[tuple[list[int], list[int]]] = [([], [])]
        self.segment_types: list[int] = []
        current_segment = None
        for token_id, type_id, seq in zip(merged.ids, merged.type_ids, merged.sequence_ids):
            if seq is None:
                self.specials[-1][0].append(token_id)
                self.specials[-1][1].append(type_id)
            elif seq != current_segment:
                current_segment = seq
                self.segment_types.append(type_id)
                self.specials.append(([], []))
        if len(self.segment_types) != (2 if pair else 1):
            raise ValueError("tokenizer post-processor template has an unexpected layout")

    def fill(self, segments: list[list[int]]) -> tuple[list[int], list[int]]:
        ids: list[int] = list(self.specials[0][0])
        types: list[int] = list(self.specials[0][1])
        for segment, type_id, (s_ids, s_types) in zip(segments, self.segment_types, self.specials[1:]):
            ids += segment
            types += [type_id] * len(segment)
            ids += s_ids
            types += s_types
        return ids, types
