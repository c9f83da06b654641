"""A model's text handling, as the compatibility routes need it (service/api/compat.py, issue 26).

The ecosystem routes take templated text and token ids; turning those into the (prompt, response) pair
the model was trained on needs the model's chat format and tokenizer. `ModelTexts` offers exactly those
operations, so a route never holds a chat format, a tokenizer or a runtime: the engine hands out the
ModelTexts of the model a request names (Engine.texts), each ServedModel builds its own (its tokenizer,
its template).
"""

from __future__ import annotations

import re

from service.chat import ChatFormat, Pair
from service.encoding import TextEncoder


class ModelTexts:
    """A model's text handling as the compatibility routes need it (service/api/compat.py): templated text
    → the (prompt, response) pair the model was trained on, chats → pairs, token ids → text. The routes get
    these operations, never the chat format or the tokenizer themselves (issue 26: the facade does not leak)."""

    def __init__(self, chat: ChatFormat, encoder: TextEncoder):
        self._chat, self._encoder = chat, encoder

    @property
    def has_template(self) -> bool:
        return self._chat.has_template

    @property
    def adds_special_tokens(self) -> bool:
        """False for a format that adds no token: an empty pair is then no input at all."""
        return self._encoder.n_special > 0

    @property
    def vocab_size(self) -> int:
        return self._encoder.tokenizer.get_vocab_size(with_added_tokens=True)

    def prepare_text(self, text: str, prompt: str | None = None) -> Pair:
        return self._chat.prepare_text(text, prompt)

    def messages_to_pair(self, messages: list[dict]) -> Pair:
        """A chat ending on the assistant's message → its pair (ChatTemplateError when it cannot be)."""
        return self._chat.messages_to_pair(messages)

    def render_to_pair(self, messages: list[dict]) -> Pair:
        """A chat that does not end on an assistant turn, scored as the template renders it."""
        return self._chat.render_to_pair(messages)  # content stays text (issue 24)

    def refusal(self, prompt: str, response: str) -> tuple[str, str] | None:
        """special_tokens_in_content=refuse: ("prompt" or "response", why) when that content holds a control
        token's text (a /v1 route answers 422 naming the field); else None (service/chat.py)."""
        return self._chat.refusal(prompt, response)

    def is_empty(self, response: str) -> bool:
        """Nothing but EOS/pad tokens and whitespace."""
        for token in (self._chat.eos_text, self._chat.special_tokens.get("pad_token")):
            if token:
                response = response.replace(token, "")
        return not response.strip()

    def serve_rm_strip(self, text: str) -> str:
        """OpenRLHF serve_rm's strip_sequence + eos, for a tokenizer whose pad token is its EOS: runs of it at
        both ends are padding (left-padded prompts, right-padded rollouts); one EOS ends the text again. Other
        pad tokens are dropped by prepare_text."""
        chat = self._chat
        eos, pad = chat.eos_text, chat.special_tokens.get("pad_token") or chat.pad_text
        if not eos or pad != eos:
            return text
        run = f"(?:{re.escape(eos)})+"
        inner = re.sub(f"^{run}", "", text)
        core = re.sub(f"{run}$", "", inner)
        if core != inner and not core.rstrip().endswith(eos):
            core += eos  # the rollout ended with EOS: keep exactly one (append_eos bundles: prepare_text drops it)
        return core

    def decode(self, sequences: list[list[int]]) -> list[str]:
        """Token ids → text with special tokens kept (runs the tokenizer: call it off the event loop)."""
        return self._encoder.tokenizer.decode_batch(sequences, skip_special_tokens=False)
