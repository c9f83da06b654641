"""Preference-temperature experiment (docs/benchmarks.md, "Calibration of preference probabilities").

    python bench/calibration_sets.py BUNDLE OUT.json [DATA_DIR]   # DATA_DIR default ../shared/data

Scores the four shared sets with BUNDLE through the serving runtime, then reports per set accuracy and
ECE at T = 1, at the bundle's own fitted temperature, at a temperature fitted on dev_in_domain, and at
the temperature fitted on the set itself (the best any single T can do there). The per-pair margins go
to OUT.json too, so other fits can be tried without scoring again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from service import calibration as cal
from service.bundle import open_bundle
from service.data import read_pairs
from service.evaluate import score_pairs
from service.runtime import load_runtime

SETS = ("dev_in_domain", "llmbar", "hhh_alignment", "mtbench_human_llmbar200")


def main(bundle: Path, out: Path, data: Path) -> None:
    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider="cpu")
    bundle_t = manifest.calibration.temperature if manifest.calibration else 1.0
    margins, started = {}, time.time()
    for name in SETS:
        pairs, _ = read_pairs(data / f"{name}.jsonl")
        prompts = [p.prompt for p in pairs]
        s = score_pairs(manifest, encoder, runtime, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        margins[name] = (s[: len(pairs)].astype(np.float64) - s[len(pairs):]).tolist()
    t_dev = cal.fit_temperature(margins["dev_in_domain"])
    result = {"bundle": str(bundle), "bundle_temperature": bundle_t, "t_fitted_on_dev_in_domain": t_dev, "sets": {}}
    for name, m in margins.items():
        t_self = cal.fit_temperature(m)
        result["sets"][name] = {"pairs": len(m), "accuracy": float(np.mean(np.array(m) > 0)),
                                "mean_confidence": float(np.mean(cal.predictions(m)[1])), "ece_T1": cal.ece(m),
                                "ece_bundle_T": cal.ece(m, bundle_t), "ece_T_dev_in_domain": cal.ece(m, t_dev),
                                "t_fitted_on_itself": t_self, "ece_T_itself": cal.ece(m, t_self)}
    result["scoring_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    out.write_text(json.dumps({**result, "margins": margins}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3] if len(sys.argv) > 3 else "../shared/data"))
