"""Preference data: read pairs from JSONL in the formats RLHF teams already have.

Accepted line shapes (one JSON object per line):
  1. explicit prompt   {"prompt": str, "chosen": str, "rejected": str, "margin"?: number}
  2. implicit prompt   {"chosen": str, "rejected": str}: two full dialogues sharing a prefix
                       (HH-RLHF / TRL); the prompt is everything up to the last "\n\nAssistant:".
  3. chat messages     {"prompt": [msg], "chosen": [msg], "rejected": [msg]}, msg = {"role","content"}
                       (or "chosen"/"rejected" as full conversations without "prompt").
Malformed lines are reported with file, line number and reason; strict mode stops at the first.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

ASSISTANT_MARK = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass
class LoadReport:
    path: str
    n_lines: int = 0
    n_pairs: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {self.n_pairs} pairs from {self.n_lines} lines"
        if self.problems:
            text += f", {len(self.problems)} malformed skipped"
        return text


class MalformedLine(ValueError):
    def __init__(self, path: str, line_no: int, reason: str):
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path, self.line_no, self.reason = path, line_no, reason


def demo_data_path() -> Path:
    """The small preference set shipped in the package so the default run needs no external data."""
    return Path(str(resources.files("service") / "demo_data" / "demo_preferences.jsonl"))


def render_messages(messages: list[dict]) -> str:
    """Chat messages as the HH-RLHF dialogue text ("\n\nHuman: ...\n\nAssistant: ...")."""
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} needs string 'role' and 'content'")
        role = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}.get(m["role"].lower())
        if role is None:
            raise ValueError(f"message {i} has unknown role {m['role']!r}")
        parts.append(f"\n\n{role}: {m['content']}")
    return "".join(parts).lstrip("\n")


def _split_dialogue(text: str) -> tuple[str, str]:
    cut = text.rfind(ASSISTANT_MARK)
    if cut < 0:
        raise ValueError("implicit-prompt dialogue has no '\\n\\nAssistant:' turn")
    end = cut + len(ASSISTANT_MARK)
    return text[:end], text[end:].strip()


def parse_record(obj: object) -> PreferencePair:
    """One JSON object → PreferencePair, or ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"missing field '{key}'")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is None:
            # full conversations: shared leading messages are the prompt, last message the answer
            if not chosen or not rejected:
                raise ValueError("empty 'chosen' or 'rejected' conversation")
            prompt_msgs, chosen_msgs, rejected_msgs = chosen[:-1], chosen[-1:], rejected[-1:]
        elif isinstance(prompt, list):
            prompt_msgs, chosen_msgs, rejected_msgs = prompt, chosen, rejected
        else:
            raise ValueError("'prompt' must be a message list when 'chosen'/'rejected' are message lists")
        prompt_text = render_messages(prompt_msgs) + ASSISTANT_MARK if prompt_msgs else ""
        chosen_text = " ".join(m.get("content", "") if isinstance(m, dict) else "" for m in chosen_msgs)
        rejected_text = " ".join(m.get("content", "") if isinstance(m, dict) else "" for m in rejected_msgs)
        render_messages(chosen_msgs), render_messages(rejected_msgs)  # validates roles/contents
        prompt, chosen, rejected = prompt_text, chosen_text.strip(), rejected_text.strip()
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            p_c, chosen = _split_dialogue(chosen)
            p_r, rejected = _split_dialogue(rejected)
            if p_c != p_r:
                raise ValueError("implicit-prompt 'chosen' and 'rejected' do not share the prompt prefix")
            prompt = p_c
        elif not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
    else:
        raise ValueError("'chosen' and 'rejected' must both be strings or both message lists")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty 'chosen' or 'rejected' response")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError("'margin' must be a finite number")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin))


def read_pairs(path: str | Path, strict: bool = False) -> tuple[list[PreferencePair], LoadReport]:
    path = str(path)
    report = LoadReport(path=path)
    pairs: list[PreferencePair] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.n_lines += 1
            try:
                pairs.append(parse_record(json.loads(line)))
            except (ValueError, json.JSONDecodeError) as exc:
                reason = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                if strict:
                    raise MalformedLine(path, line_no, reason) from None
                report.problems.append((line_no, reason))
    report.n_pairs = len(pairs)
    return pairs, report


def prompt_bucket(prompt: str) -> float:
    """A stable number in [0, 1) from the prompt text: same prompt, same side of the split, always."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(pairs: Iterable[PreferencePair], dev_fraction: float = 0.1) -> tuple[list, list]:
    train, dev = [], []
    for p in pairs:
        (dev if prompt_bucket(p.prompt) < dev_fraction else train).append(p)
    return train, dev
