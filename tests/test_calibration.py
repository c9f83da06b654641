"""Preference-probability calibration (service/calibration.py): ECE by hand, the temperature fit, Wilson, and
a real over-confident bundle whose exported temperature brings dev ECE down.

The over-confident bundle is made for real: the session's tiny trained checkpoint (tests/conftest.py
`bundle`: the real trainer, 1 epoch on the demo set) with its reward head's weight and bias multiplied by
40 (reward_head.safetensors rewritten), then exported by the real exporter (ONNX, parity-checked) with
the checkpoint's own held-out reference pairs: the same rankings, margins 40 times larger, so
σ(margin) is near 0 or 1 while accuracy stays where it was.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

# Six pairs, margins r_chosen − r_rejected written out; 10 bins over [0.5, 1], each 0.05 wide.
MARGINS = [2.0, -2.0, 0.5, 0.0, 3.0, -0.2]
# By hand: confidence of the predicted side σ(|m|), correct when m > 0 (the tie m = 0 is wrong):
#   m =  2.0: σ(2)   = 0.880797  right  -> bin [0.85, 0.90)  (index 7)
#   m = -2.0: σ(2)   = 0.880797  wrong  -> bin 7
#   m =  0.5: σ(0.5) = 0.622459  right  -> bin [0.60, 0.65)  (index 2)
#   m =  0.0: σ(0)   = 0.5       wrong  -> bin [0.50, 0.55)  (index 0)
#   m =  3.0: σ(3)   = 0.952574  right  -> bin [0.95, 1.00]  (index 9)
#   m = -0.2: σ(0.2) = 0.549834  wrong  -> bin [0.50, 0.55)  (index 0)
# bin 0: 2 pairs, accuracy 0,   confidence (0.5 + 0.549834)/2 = 0.524917 -> gap 0.524917
# bin 2: 1 pair,  accuracy 1,   confidence 0.622459                   -> gap 0.377541
# bin 7: 2 pairs, accuracy 0.5, confidence 0.880797                   -> gap 0.380797
# bin 9: 1 pair,  accuracy 1,   confidence 0.952574                   -> gap 0.047426
# ECE = (2 * 0.524917 + 1 * 0.377541 + 2 * 0.380797 + 1 * 0.047426) / 6 = 2.236394 / 6 = 0.372732
ECE_BY_HAND = 0.372732
# At T = 2 the confidences become σ(1) = 0.731059 (x2, bin 4), σ(0.25) = 0.562177 (bin 1), 0.5 (bin 0),
# σ(1.5) = 0.817574 (bin 6), σ(0.1) = 0.524979 (bin 0):
# bin 0: acc 0, conf 0.512490 (x2); bin 1: acc 1, conf 0.562177; bin 4: acc 0.5, conf 0.731059 (x2);
# bin 6: acc 1, conf 0.817574.  ECE = (2*0.512490 + 0.437823 + 2*0.231059 + 0.182426) / 6 = 2.107347 / 6
# = 0.351224
ECE_AT_2_BY_HAND = 0.351224


def test_ece_matches_the_hand_computation():
    from service.calibration import ece, reliability

    assert ece(MARGINS) == pytest.approx(ECE_BY_HAND, abs=1e-5)
    assert ece(MARGINS, temperature=2.0) == pytest.approx(ECE_AT_2_BY_HAND, abs=1e-5)
    bins = reliability(MARGINS)
    assert [b["pairs"] for b in bins] == [2, 0, 1, 0, 0, 0, 0, 2, 0, 1]
    assert bins[7]["accuracy"] == 0.5 and bins[7]["confidence"] == pytest.approx(0.880797, abs=1e-6)
    assert bins[0]["low"] == 0.5 and bins[9]["high"] == 1.0
    assert ece([]) is None


def test_fitted_temperature_minimises_the_nll():
    from service.calibration import fit_temperature, nll

    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 1.5, 4000)
    labels = rng.random(4000) < 1 / (1 + np.exp(-true))  # the human label follows σ(true margin)
    margins = np.where(labels, true, -true) * 5.0  # what an over-confident model reports: 5x the margin
    t = fit_temperature(margins)
    assert 4.0 < t < 6.0  # recovers the scale it was given
    grid = np.exp(np.linspace(math.log(0.05), math.log(50), 2001))
    assert nll(margins, t) <= min(nll(margins, g) for g in grid) + 1e-6
    assert fit_temperature(np.abs(margins)) == pytest.approx(0.01, rel=1e-3)  # all right: the lower bound
    assert fit_temperature([]) == 1.0


def test_temperature_never_changes_accuracy_below_half():
    """The honest limit: accuracy is the same at every T, so on a set the model gets mostly wrong the
    best temperature is 'no confidence' and ECE cannot go below 0.5 − accuracy."""
    from service.calibration import ece, fit_temperature, summary

    margins = np.array([-3.0, -2.0, -1.5, 2.5, -2.5, 1.0, -4.0, -0.5])  # 2 of 8 right
    t = fit_temperature(margins)
    before, after = summary(margins), summary(margins, t)
    assert before["accuracy"] == after["accuracy"] == 0.25
    assert t > 1.0 and after["ece_at_temperature"] < before["ece"]
    assert after["ece_at_temperature"] >= 0.5 - 0.25 - 1e-9
    assert ece(margins, 100.0) == pytest.approx(0.25, abs=0.01)


def test_wilson_interval():
    from service.calibration import wilson

    lo, hi = wilson(81, 100)  # textbook value: 0.7222 .. 0.8749
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.8749, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) is None


@pytest.fixture(scope="module")
def overconfident_bundle(bundle, tmp_path_factory):
    """The session's trained tiny checkpoint with its head scaled by 40, exported for real."""
    import torch
    from safetensors.torch import load_file, save_file

    from export.exporter import export_bundle

    root = tmp_path_factory.mktemp("overconfident")
    checkpoint = root / "best"
    shutil.copytree(bundle.parent / "run" / "best", checkpoint)
    head = load_file(checkpoint / "reward_head.safetensors")
    save_file({k: (v.to(torch.float32) * 40.0).contiguous() for k, v in head.items()},
              checkpoint / "reward_head.safetensors")
    # an evaluation set the trainer reported on (`train --eval FILE` records it in eval_results.json): the
    # dev pairs with their sides swapped, so the exporter has a second set to write a row for
    rows = [json.loads(line) for line in (checkpoint / "reference_pairs.jsonl").read_text().splitlines()]
    swapped = root / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows))
    evals = json.loads((checkpoint / "eval_results.json").read_text())
    evals["results"]["swapped"] = {"path": str(swapped), "accuracy": None}
    (checkpoint / "eval_results.json").write_text(json.dumps(evals))
    return export_bundle(checkpoint, root / "bundle", fmt="onnx", calibrate_temperature=True)


def test_few_dev_pairs_fit_no_temperature_by_default(bundle):
    """The session bundle was exported with the default: its dev pairs are too few to fit a temperature on."""
    from export.exporter import MIN_TEMPERATURE_PAIRS
    from service.bundle import read_manifest

    n = len((bundle / "reference_pairs.jsonl").read_text().splitlines())
    c = read_manifest(bundle).calibration
    assert 0 < n < MIN_TEMPERATURE_PAIRS
    assert c is not None and not c.fitted and c.temperature == 1.0 and c.sets[0]["pairs"] == n


def test_overconfident_bundle_gets_a_temperature_above_one(overconfident_bundle, bundle):
    from service.bundle import read_manifest
    from service.calibration import ece, fit_temperature
    from service.data import read_pairs
    from service.evaluate import score_pairs
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest = read_manifest(overconfident_bundle)
    c = manifest.calibration
    assert c is not None and c.fitted and c.fitted_on == "dev"
    assert c.temperature > 1.0
    assert c.ece_after["dev"] < c.ece_before["dev"]
    # recomputed here from the exported bundle's own runtime and its reference (dev) pairs
    manifest, encoder = open_bundle(overconfident_bundle)
    runtime = load_runtime(overconfident_bundle, manifest, provider="cpu", intra_op_threads=1)
    pairs, _ = read_pairs(overconfident_bundle / "reference_pairs.jsonl")
    prompts = [p.prompt for p in pairs]
    margins = (score_pairs(manifest, encoder, runtime, prompts, [p.chosen for p in pairs]).astype(np.float64)
               - score_pairs(manifest, encoder, runtime, prompts, [p.rejected for p in pairs]))
    assert c.temperature == pytest.approx(fit_temperature(margins), rel=1e-3)
    assert c.ece_before["dev"] == pytest.approx(ece(margins), abs=1e-4)
    assert c.ece_after["dev"] == pytest.approx(ece(margins, c.temperature), abs=1e-4)
    row = c.sets[0]
    assert row["set"] == "dev" and row["pairs"] == len(pairs)
    assert row["accuracy"] == pytest.approx(np.mean(margins > 0))
    # the second set: the same pairs swapped, so every right ranking is wrong there (ties stay wrong)
    swapped = c.sets[1]
    assert swapped["set"] == "swapped" and swapped["pairs"] == len(pairs)
    assert swapped["accuracy"] == pytest.approx(np.mean(margins < 0))
    assert c.ece_before["swapped"] == pytest.approx(ece(-margins), abs=1e-4)
    assert c.ece_after["swapped"] == pytest.approx(ece(-margins, c.temperature), abs=1e-4)
    # the unscaled bundle, same rankings, is far less confident: its fitted T is ~40 times smaller
    plain = read_manifest(bundle).calibration
    assert plain is not None and plain.temperature < c.temperature / 10


def test_export_without_calibration_keeps_t_one(bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "export", str(bundle.parent / "run"), "--out",
                           str(tmp_path / "b"), "--no-calibrate-temperature"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert c["temperature"] == 1.0 and not c["fitted"]
    assert c["ece_after"] == c["ece_before"] and "dev" in c["ece_before"]
    assert "preference temperature 1.000 (not fitted)" in proc.stdout


def test_models_route_shows_the_temperature(overconfident_bundle, start_server):
    import httpx

    from service.bundle import read_manifest

    server = start_server(overconfident_bundle)
    info = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    c = read_manifest(overconfident_bundle).calibration
    assert info["calibration"]["temperature"] == pytest.approx(c.temperature) and c.temperature > 1.0
    assert info["calibration"]["ece_after"]["dev"] == pytest.approx(c.ece_after["dev"])
