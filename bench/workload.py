"""The serving benchmark's workloads: real preference texts cut by the bundle's own tokenizer.

  fixed128  every item is exactly 128 tokens (special tokens included; the bundle's max_length if smaller)
  mixed     lengths drawn uniformly from 16..512 tokens (or the bundle's max_length if smaller)
  rank      best-of-N: distinct 48-token prompts (one per request) and RANK_N real responses

Every item of a pool is a distinct text, so no score cache can answer a request of a run. The texts
are the (prompt, chosen) and (prompt, rejected) sides of `<data_dir>/train.jsonl`, read with the
service's own reader (service.data.read_pairs). There is no fallback set: the pools need thousands of
distinct texts long enough to cut to 512 tokens, which the packaged demo set does not have.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

RANK_N = 16  # candidates per best-of-N request
RANK_PROMPT_TOKENS = 48


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) for both sides of every pair with an explicit prompt, in file order."""
    from service.data import read_pairs

    pairs, _ = read_pairs(path)
    return [t for p in pairs if p.prompt for t in ((p.prompt, p.chosen), (p.prompt, p.rejected))]


class Cutter:
    """Cuts real (prompt, response) texts so that the pair encodes to exactly `n` tokens (checked by encoding)."""

    def __init__(self, encoder, texts: list[tuple[str, str]]):
        self.encoder = encoder
        tok = encoder.tokenizer
        self.texts = texts
        self.p_off = [e.offsets for e in tok.encode_batch([p for p, _ in texts], add_special_tokens=False)]
        self.r_off = [e.offsets for e in tok.encode_batch([r for _, r in texts], add_special_tokens=False)]

    def cut(self, i: int, n: int, shift: int = 0) -> tuple[str, str] | None:
        """`shift` moves the prompt/response split, so one text can give several distinct items."""
        prompt, response = self.texts[i]
        p_off, r_off = self.p_off[i], self.r_off[i]
        body = n - self.encoder.n_special
        r = min(len(r_off), max(1, body // 2 - shift))
        p = body - r
        if p > len(p_off):
            p = len(p_off)
            r = body - p
        if p < 1 or r < 1 or r > len(r_off):
            return None
        pt, rt = prompt[: p_off[p - 1][1]].strip(), response[: r_off[r - 1][1]].strip()
        if not pt or not rt:
            return None
        e = self.encoder.encode([pt], [rt])[0]
        return (pt, rt) if e.n_tokens == n and not e.truncated else None

    def cut_prompt(self, i: int, n: int) -> str | None:
        off = self.p_off[i]
        return self.texts[i][0][: off[n - 1][1]].strip() if len(off) >= n else None

    def cut_response(self, i: int, n: int) -> str | None:
        off = self.r_off[i]
        if len(off) < n:
            return None
        text = self.texts[i][1][: off[n - 1][1]].strip()
        return text if len(self.encoder.tokenizer.encode(text, add_special_tokens=False).ids) == n else None


def build_workloads(bundle: Path, data_dir: Path, seed: int, n_fixed: int, n_mixed: int, n_prompts: int) -> dict:
    """{"workloads": {"fixed128": [item], "mixed": [item]}, "max_length": int, "rank": {...}}, an item being
    {"prompt", "response", "n_tokens"}; the same seed and data give the same pools."""
    from service.bundle import open_bundle

    source = Path(data_dir) / "train.jsonl"
    if not source.is_file():
        raise SystemExit(f"no {source}: --data-dir must hold the preference set train.jsonl")
    manifest, encoder = open_bundle(bundle)
    max_len = manifest.text.max_length
    texts = read_texts(source)
    rng = np.random.default_rng(seed)
    cutter = Cutter(encoder, texts)
    cursor = itertools.cycle(rng.permutation(len(texts)).tolist())

    def make(lengths: list[int]) -> list[dict]:
        items, seen, used = [], set(), 0
        for n in lengths:
            for _ in range(len(texts)):
                i = next(cursor)
                got = cutter.cut(i, n, shift=4 * (used // len(texts)))  # a new split on each pass
                used += 1
                if got and got not in seen:  # chosen and rejected often share a prefix: no duplicates
                    seen.add(got)
                    items.append({"prompt": got[0], "response": got[1], "n_tokens": n})
                    break
            else:
                raise SystemExit(f"no text in {source} can be cut to {n} tokens")
        return items

    workloads = {
        "fixed128": make([min(128, max_len)] * n_fixed),
        "mixed": make(rng.integers(16, min(512, max_len) + 1, size=n_mixed).tolist()),
    }
    # best-of-N: distinct real prompts of 48 tokens (one per request), RANK_N real responses of 32..max tokens
    prompts: list[str] = []
    for _ in range(len(texts)):
        got = cutter.cut_prompt(next(cursor), RANK_PROMPT_TOKENS)
        if got and got not in prompts:
            prompts.append(got)
            if len(prompts) == n_prompts:
                break
    r_hi = max_len - RANK_PROMPT_TOKENS - encoder.n_special - 2
    responses = []
    for n in rng.integers(32, r_hi + 1, size=RANK_N).tolist():
        for _ in range(len(texts)):
            got = cutter.cut_response(next(cursor), n)
            if got:
                responses.append(got)
                break
    enc = encoder.encode_shared_prompt(prompts[0], responses)
    return {"workloads": workloads, "max_length": max_len,
            "rank": {"prompts": prompts, "responses": responses, "n_tokens": [e.n_tokens for e in enc]}}
