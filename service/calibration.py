"""Calibration of preference probabilities: is σ(r_chosen − r_rejected) the chance the model ranks a pair right?

A Bradley-Terry reward model's margin m = r_a − r_b, through the logistic function, is read as P(a ≻ b)
(`/v1/compare` returns it). Whether that probability means what it says is a property of the model *and*
the data, so it is measured per evaluation set:

  * every pair gives the model's prediction (chosen wins when m > 0) and its confidence in that
    prediction, c = σ(|m| / T) ∈ [0.5, 1); a tie (m = 0) has confidence 0.5 and counts as wrong, as in
    `rewardserve eval`'s accuracy;
  * **ECE** (expected calibration error), the definition used everywhere in this project: the predicted
    side's confidences are put into `bins` equal-width bins over [0.5, 1.0] (10 by default; the last bin
    includes 1.0), and ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|. Bins over [0.5, 1] rather
    than [0, 1]: the confidence of the predicted side of a two-way choice is never below 0.5, so [0, 1]
    bins would leave half of them empty (10 bins over [0, 1] are 5 bins over [0.5, 1]);
  * **temperature** T: one positive number dividing every margin (Guo et al., 2017). It is fitted by
    minimising the negative log-likelihood of the human labels, mean(−log σ(m / T)), over dev pairs: a 1-D
    problem, solved by a bounded golden-section search over log T (numpy only; scipy is not a dependency of
    the package). The NLL is convex in 1/T, hence unimodal in log T, so the search finds its minimum.

What a temperature cannot do: it rescales every margin by the same positive factor, so it never changes
which side the model prefers: accuracy (and the ranking of responses) is the same at every T. It moves
confidence toward 0.5 (T > 1, an over-confident model) or away from it (T < 1). On a set where the model
is right less than half of the time, the best it can do is confidence ≈ 0.5 everywhere: ECE then stays
at about 0.5 − accuracy, and a temperature fitted on in-domain dev pairs will not even do that for an
out-of-domain set where the model is confidently wrong.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 10
T_BOUNDS = (0.01, 100.0)  # the search interval of the fitted temperature
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def sigmoid(x) -> np.ndarray:
    """The logistic function without overflow warnings for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def predictions(margins, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(correct, confidence) per pair: the model is right when the chosen side scores higher (a tie is
    wrong); its confidence is the probability it gives the side it predicts, σ(|m| / T)."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    return m > 0, sigmoid(np.abs(m) / temperature)


def reliability(margins, temperature: float = 1.0, bins: int = DEFAULT_BINS) -> list[dict]:
    """The reliability diagram's data: per equal-width confidence bin over [0.5, 1.0], its edges, the
    number of pairs, their accuracy and mean confidence (None for an empty bin)."""
    correct, conf = predictions(margins, temperature)
    index = np.minimum(((conf - 0.5) / 0.5 * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        out.append({"low": 0.5 + 0.5 * b / bins, "high": 0.5 + 0.5 * (b + 1) / bins, "pairs": int(mask.sum()),
                    "accuracy": float(correct[mask].mean()) if mask.any() else None,
                    "confidence": float(conf[mask].mean()) if mask.any() else None})
    return out


def ece(margins, temperature: float = 1.0, bins: int = DEFAULT_BINS) -> float | None:
    """Expected calibration error (module docstring); None for no pairs."""
    rows = reliability(margins, temperature, bins)
    n = sum(r["pairs"] for r in rows)
    if n == 0:
        return None
    return float(sum(r["pairs"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["pairs"]))


def nll(margins, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the human labels (chosen ≻ rejected) under σ(m / T)."""
    m = np.asarray(margins, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, -m)))  # −log σ(x) = log(1 + e^−x), computed stably


def fit_temperature(margins, bounds: tuple[float, float] = T_BOUNDS, tol: float = 1e-5) -> float:
    """The T in `bounds` minimising nll(margins, T): golden-section search over log T. A model that ranks
    every dev pair right is best at T → 0, one that ranks them at chance at T → ∞: the search then stops
    at a bound, which is reported as such (the fit is a number, not a verdict on the model)."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if m.size == 0 or not np.any(m):
        return 1.0  # nothing to fit on
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    f = lambda log_t: nll(m, math.exp(log_t))  # noqa: E731
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = f(b)
    return float(math.exp((lo + hi) / 2))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion (good at small n and near 0 or 1, unlike p ± z·se)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summary(margins, temperature: float = 1.0, bins: int = DEFAULT_BINS) -> dict:
    """Accuracy, mean confidence, ECE and the reliability bins, at T = 1 (raw σ) and at `temperature`."""
    correct, conf = predictions(margins)
    _, conf_t = predictions(margins, temperature)
    n = int(correct.size)
    return {
        "pairs": n,
        "accuracy": float(correct.mean()) if n else None,
        "bins": bins,
        "temperature": float(temperature),
        "mean_confidence": float(conf.mean()) if n else None,
        "ece": ece(margins, 1.0, bins),
        "mean_confidence_at_temperature": float(conf_t.mean()) if n else None,
        "ece_at_temperature": ece(margins, temperature, bins),
        "nll": nll(margins) if n else None,
        "nll_at_temperature": nll(margins, temperature) if n else None,
        "reliability": reliability(margins, 1.0, bins),
        "reliability_at_temperature": reliability(margins, temperature, bins),
    }
