"""`rewardserve audit` (service/audit.py) on bundles whose behaviour is known by construction.

Two synthetic bundles are real ONNX graphs (onnx.helper) packaged with the MiniLM tokenizer and a valid,
checksummed manifest, run by the real ONNX Runtime:
  * "length": reward = number of tokens (sum of attention_mask): pure length;
  * "content": reward = 1 if the token "good" appears anywhere, else 0: blind to length.
The preference data puts "good" in every chosen response and draws both lengths at random, so the right
answer never depends on length. Plus the `bundle` fixture (the real trainer and exporter): the CLI prints
the table and writes audit.json and audit.png, and the exporter's manifest carries the same figures.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, copy_tokenizer, finish_planted_bundle, write_jsonl

PROMPT = "Tell me about the weather today."
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "went", "home", "slowly", "again"]


def synthetic_pairs(n: int = 240, seed: int = 0, max_words: int = 180) -> list[dict]:
    """Chosen responses start with "good", rejected ones with "fine"; lengths independent and random."""
    rng = random.Random(seed)

    def text(first: str) -> str:
        return " ".join([first] + [rng.choice(WORDS) for _ in range(rng.randint(2, max_words))])

    return [{"prompt": PROMPT, "chosen": text("good"), "rejected": text("fine")} for _ in range(n)]


def _onnx_model(kind: str, good_id: int, vocab: int):
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("reward", TensorProto.FLOAT, ["batch"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT)]
    inits = [axes]
    if kind == "length":
        nodes.append(helper.make_node("ReduceSum", ["maskf", "axes"], ["reward"], keepdims=0))
    else:
        table = np.zeros(vocab, dtype=np.float32)
        table[good_id] = 1.0
        inits.append(onnx.numpy_helper.from_array(table, "table"))
        nodes += [helper.make_node("Gather", ["table", "input_ids"], ["hits"]),
                  helper.make_node("Mul", ["hits", "maskf"], ["masked"]),
                  helper.make_node("ReduceMax", ["masked", "axes"], ["reward"], keepdims=0)]
    graph = helper.make_graph(nodes, f"{kind}-reward", [ids, mask], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def synthetic_bundle(root: Path, kind: str, reference: list[dict], max_length: int = 512) -> Path:
    """A servable bundle whose reward is `kind` ("length" or "content"), calibrated on `reference` with
    the real runtime, as the exporter calibrates."""
    import onnx

    from service.encoding import TextEncoder, TextFormat

    out = root / f"{kind}-rm"
    out.mkdir(parents=True)
    copy_tokenizer(out)
    text = TextFormat(join="pair", max_length=max_length, pad_token_id=0, uses_token_type_ids=True)
    encoder = TextEncoder.from_dir(out, text)
    onnx.save(_onnx_model(kind, encoder.tokenizer.token_to_id("good"), encoder.tokenizer.get_vocab_size()),
              out / "model.onnx")
    return finish_planted_bundle(out, encoder, text, write_jsonl(root / f"{kind}-reference.jsonl", reference))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    reference = synthetic_pairs(seed=1)
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(seed=2))
    return {kind: synthetic_bundle(root, kind, reference) for kind in ("length", "content")}, data


def _audit(bundle: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "audit", "--bundle", str(bundle), "--data",
                           str(data), "--out", str(out), "--threads", "1", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_pure_length_bundle_is_caught(synthetic, tmp_path):
    bundles, data = synthetic
    proc = _audit(bundles["length"], data, tmp_path, "--no-picture")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["length"]["spearman"] > 0.99
    assert report["length"]["slope_z_per_100_tokens"] > 0
    # The longer side always wins: right exactly when chosen is longer, so no better than chance overall.
    assert report["accuracy_chosen_shorter"] <= 0.05
    assert report["accuracy_chosen_longer"] >= 0.95
    assert report["pairs_chosen_shorter"] > 50 and report["pairs_chosen_longer"] > 50
    assert abs(report["accuracy"] - report["longer_wins_baseline"]) < 0.05
    assert abs(report["accuracy"] - 0.5) < 0.15
    probe = report["perturbation"]
    assert probe["mean_dz_padded"] > 0.1 and probe["share_up_padded"] == 1.0
    assert probe["mean_dz_truncated"] < -0.1
    assert "Spearman(score, length)" in proc.stdout and not (tmp_path / "audit.png").exists()


def test_length_blind_bundle_is_not_flagged(synthetic, tmp_path):
    bundles, data = synthetic
    proc = _audit(bundles["content"], data, tmp_path, "--no-picture")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert abs(report["length"]["spearman"]) < 0.2
    assert report["accuracy"] == 1.0
    assert report["accuracy_chosen_shorter"] == 1.0 and report["accuracy_chosen_longer"] == 1.0
    assert abs(report["perturbation"]["mean_dz_padded"]) < 1e-6
    assert abs(report["perturbation"]["mean_dz_truncated"]) < 1e-6


def test_spearman_matches_definition():
    from service.audit import rank, spearman

    assert rank(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    x = np.arange(20.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(20)) is None


def test_cli_on_trained_bundle_writes_table_json_and_png(bundle, tmp_path):
    from service.data import demo_data_path

    proc = _audit(bundle, demo_data_path(), tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    for label in ("accuracy, chosen shorter", "longer-wins baseline", "slope, z per 100 tokens",
                  "mean dz, padded with filler", "share above calibration p99"):
        assert label in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["pairs"] > 0 and 0 <= report["accuracy"] <= 1
    assert sum(report["calibration"]["z_histogram"]["counts"]) == 2 * report["pairs"]
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_refuses_bad_input_in_one_line(bundle, tmp_path):
    proc = _audit(bundle, tmp_path / "missing.jsonl", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("rewardserve audit: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_records_the_audit_in_the_manifest(bundle, offline):
    """The manifest's audit figures equal the same figures recomputed here from the bundle's reference pairs,
    scored again by the offline ONNX path (service.evaluate.score_pairs, not the exporter's scores)."""
    from service.audit import HIST_BINS, padded
    from service.data import read_pairs
    from service.evaluate import score_pairs

    manifest, encoder, runtime = offline
    audit = manifest.audit
    assert audit is not None and "_points" not in audit
    pairs, _ = read_pairs(bundle / "reference_pairs.jsonl")
    n = len(pairs)
    prompts = [p.prompt for p in pairs]
    chosen = score_pairs(manifest, encoder, runtime, prompts, [p.chosen for p in pairs])
    rejected = score_pairs(manifest, encoder, runtime, prompts, [p.rejected for p in pairs])
    raw = np.concatenate([chosen, rejected]).astype(np.float64)
    wins = chosen > rejected
    tokens = np.array([e.response_tokens for e in encoder.encode(prompts * 2, [p.chosen for p in pairs]
                                                                  + [p.rejected for p in pairs])])
    shorter = tokens[:n] < tokens[n:]
    assert audit["pairs"] == n > 0
    assert audit["accuracy"] == pytest.approx(wins.mean())
    assert audit["pairs_chosen_shorter"] == int(shorter.sum()) > 0
    assert audit["accuracy_chosen_shorter"] == pytest.approx(wins[shorter].mean())
    assert audit["longer_wins_baseline"] == pytest.approx(np.mean([len(p.chosen) > len(p.rejected) for p in pairs]))
    calibration = audit["calibration"]
    assert calibration["n"] == 2 * n
    assert calibration["mean"] == pytest.approx(raw.mean(), abs=1e-5)
    assert calibration["std"] == pytest.approx(raw.std(), abs=1e-5)
    z = (raw - calibration["mean"]) / calibration["std"]
    counts, _ = np.histogram(np.clip(z, HIST_BINS[0], HIST_BINS[-1]), bins=HIST_BINS)
    assert calibration["z_histogram"]["counts"] == counts.tolist()
    assert calibration["share_above_p99"] == pytest.approx(np.mean(raw > np.percentile(raw, 99)))
    assert audit["length"]["mean_response_tokens"] == pytest.approx(tokens.mean())
    # the padding probe: the same responses with filler appended, scored again; mean change of z
    probe = audit["perturbation"]
    idx = np.linspace(0, 2 * n - 1, num=probe["items"], dtype=np.int64)
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    moved = score_pairs(manifest, encoder, runtime, [(prompts * 2)[i] for i in idx],
                        [padded(responses[i], int(tokens[i])) for i in idx])
    dz = (np.asarray(moved, dtype=np.float64) - raw[idx]) / calibration["std"]
    assert probe["items"] == min(256, 2 * n)
    assert probe["mean_dz_padded"] == pytest.approx(dz.mean(), abs=1e-4)
    assert probe["share_up_padded"] == pytest.approx(np.mean(dz > 0))


def test_several_sets_give_one_row_each(synthetic, tmp_path):
    """The length-blind bundle scores 1 for a chosen response and 0 for a rejected one, so every margin is
    ±1 and its confidence σ(1): on the data as given it is always right (ECE = 1 − σ(1)), on the same
    pairs with the sides swapped always wrong (ECE = σ(1)); the rows sit side by side."""
    from service.evaluate import longer_wins_baseline
    from service.data import read_pairs

    bundles, data = synthetic
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                       for r in rows[:100]])
    proc = _audit(bundles["content"], data, tmp_path / "out", "--no-picture", "--no-probes")
    single = json.loads((tmp_path / "out" / "audit.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "service.cli", "audit", "--bundle", str(bundles["content"]),
                           "--data", str(data), str(swapped), "--out", str(tmp_path / "two"), "--threads", "1",
                           "--no-picture", "--no-probes"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "two" / "audit.json").read_text())
    first, second = report["sets"]
    s1 = 1 / (1 + np.exp(-1.0))
    assert first["set"] == "pairs" and first["pairs"] == 240 and first["accuracy"] == 1.0
    assert second["set"] == "swapped" and second["pairs"] == 100 and second["accuracy"] == 0.0
    assert first["mean_confidence"] == pytest.approx(s1) and second["mean_confidence"] == pytest.approx(s1)
    assert first["ece"] == pytest.approx(1 - s1) and second["ece"] == pytest.approx(s1)
    assert first["temperature"] == 1.0 and first["ece_at_temperature"] == first["ece"]
    # Wilson 95 % interval of 240/240 and 0/100: z^2 / (n + z^2) from the edge
    assert first["accuracy_ci95"][1] == 1.0 and first["accuracy_ci95"][0] == pytest.approx(240 / (240 + 1.96 ** 2))
    assert second["accuracy_ci95"][0] == 0.0 and second["accuracy_ci95"][1] == pytest.approx(1.96 ** 2 / (100 + 1.96 ** 2))
    assert first["longer_wins_baseline"] == pytest.approx(longer_wins_baseline(read_pairs(data)[0]))
    assert second["longer_wins_baseline"] == pytest.approx(longer_wins_baseline(read_pairs(swapped)[0]))
    assert abs(first["length_spearman"]) < 0.2
    # the first set's figures stay at the top level, as a single --data audit writes them
    assert report["accuracy"] == single["accuracy"] == 1.0 and report["pairs"] == single["pairs"] == 240
    assert set(report["by_set"]) == {"pairs", "swapped"} and report["by_set"]["swapped"]["accuracy"] == 0.0
    assert "swapped" in proc.stdout and "ECE@T" in proc.stdout


def _section(text: str, heading: str) -> list[str]:
    """The table rows under a markdown heading of audit_examples.md (up to the next heading)."""
    lines = text.split(heading, 1)[1].split("\n###", 1)[0].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| #")]


def test_examples_file_holds_the_real_extremes(bundle, offline, tmp_path):
    """audit_examples.md's highest- and lowest-scored responses and most confidently misranked pairs are the
    ones the bundle's own runtime scores so (scored again here through service.evaluate.score_pairs)."""
    from service.audit_report import shorten
    from service.calibration import sigmoid
    from service.data import demo_data_path, read_pairs
    from service.evaluate import score_pairs

    proc = _audit(bundle, demo_data_path(), tmp_path, "--no-picture", "--no-probes", "--max-pairs", "120")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "audit_examples.md").read_text()
    manifest, encoder, runtime = offline
    pairs = read_pairs(demo_data_path())[0][:120]
    prompts = [p.prompt for p in pairs]
    raw = np.concatenate([score_pairs(manifest, encoder, runtime, prompts, [p.chosen for p in pairs]),
                          score_pairs(manifest, encoder, runtime, prompts, [p.rejected for p in pairs])]).astype(np.float64)
    z = manifest.normalization.z_score(raw)
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    t = manifest.calibration.temperature if manifest.calibration else 1.0
    for heading, order in (("highest-scored responses", np.argsort(-raw)[:10]),
                           ("lowest-scored responses", np.argsort(raw)[:10])):
        rows = _section(text, heading)
        assert len(rows) == 10
        for row, i in zip(rows, order):
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert float(cells[1].split()[0]) == pytest.approx(z[i], abs=2e-3), (heading, row)
            assert cells[4] == shorten(texts[i], 300)
    margins = raw[:120] - raw[120:]
    wrong = [i for i in np.argsort(margins) if margins[i] < 0][:10]
    rows = _section(text, "most confidently misranked pairs")
    assert len(rows) == len(wrong) > 0
    for row, i in zip(rows, wrong):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert float(cells[1]) == pytest.approx(sigmoid(-margins[i] / t), abs=2e-3)
        assert cells[5] == shorten(pairs[i].chosen, 300) and cells[6] == shorten(pairs[i].rejected, 300)
