"""The "longer response wins" baseline: one definition (characters, a tie is not a win), one number from every
command that reports it (the trainer's eval, `rewardserve eval`, `rewardserve audit`, the manifest).

They used to disagree on the same 416 dev pairs: 0.4543 from the trainer and eval (characters, a tie wrong)
and 0.464 from the audit (tokens, a tie wrong)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from service.data import PreferencePair, read_pairs
from tests.helpers import REPO, write_jsonl

PROMPT = "Human: Which answer is better?\n\nAssistant:"
# chosen vs rejected, by characters: longer, shorter, equal (a tie), longer, longer; the fourth pair is longer
# in characters but shorter in tokens (one long word vs fifteen short ones), so a token count would disagree
ROWS = [
    {"prompt": PROMPT, "chosen": "A complete and careful answer.", "rejected": "No."},
    {"prompt": PROMPT, "chosen": "Yes.", "rejected": "It depends on many things."},
    {"prompt": PROMPT, "chosen": "Paris.", "rejected": "Lyon."[:4] + "s."},  # 6 and 6 characters
    {"prompt": PROMPT, "chosen": "Supercalifragilisticexpialidocious", "rejected": "a b c d e f g h i j k l m n o"},
    {"prompt": PROMPT, "chosen": "Use a drop of oil on the hinge pin.", "rejected": "Oil it."},
]
EXPECTED = (1 + 0 + 0 + 1 + 1) / 5


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("longer") / "pairs.jsonl", ROWS)
    pairs, report = read_pairs(path)
    assert len(pairs) == 5 and not report.problems
    assert len(pairs[2].chosen) == len(pairs[2].rejected)  # the tie is a tie
    return path, pairs


def test_definition_counts_a_tie_as_no_win(pairs_file):
    from service.evaluate import longer_wins_baseline

    _, pairs = pairs_file
    assert longer_wins_baseline(pairs) == EXPECTED
    assert longer_wins_baseline([PreferencePair(prompt="p", chosen="ab", rejected="cd")]) == 0.0
    assert longer_wins_baseline([PreferencePair(prompt="p", chosen="abc", rejected="cd")]) == 1.0
    assert math.isnan(longer_wins_baseline([]))


def test_eval_audit_and_trainer_report_the_same_baseline(pairs_file, bundle, offline, tmp_path):
    path, pairs = pairs_file
    manifest, encoder, runtime = offline
    # the last pair really is longer in characters and shorter in tokens: a token count would differ
    chosen, rejected = encoder.encode([PROMPT] * 2, [pairs[3].chosen, pairs[3].rejected])
    assert chosen.response_tokens < rejected.response_tokens

    from service.audit import audit_figures
    from service.evaluate import evaluate_file

    assert evaluate_file(manifest, encoder, runtime, str(path))["length_baseline"] == EXPECTED
    assert audit_figures(runtime, encoder, pairs, manifest.normalization)["longer_wins_baseline"] == EXPECTED

    # the CLI commands as users run them
    out = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--bundle", str(bundle), "--data", str(path),
                          "--json", "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["length_baseline"] == EXPECTED
    out = subprocess.run([sys.executable, "-m", "service.cli", "audit", "--bundle", str(bundle), "--data", str(path),
                          "--out", str(tmp_path), "--no-picture", "--threads", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "audit.json").read_text())["longer_wins_baseline"] == EXPECTED

    # the trainer's evaluation (what train prints and the manifest's eval figures keep)
    from export.model import load_reward_model
    from export.train import evaluate
    from service.encoding import TextEncoder

    checkpoint = bundle.parent / "run" / "best"
    model, text = load_reward_model(checkpoint)
    assert evaluate(model, TextEncoder.from_dir(checkpoint, text), pairs, "cpu")["length_baseline"] == EXPECTED
