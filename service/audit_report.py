"""What `rewardserve audit` writes for a person to read: the text tables, audit.png and audit_examples.md.

service/audit.py computes the figures; this module only renders them, so the figures stay testable as
numbers and the renderings can change without touching them. matplotlib is imported lazily (the picture
is optional: `pip install 'rewardserve[audit]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from service.data import PreferencePair

EXAMPLES = 10  # responses / pairs per list in audit_examples.md
PROMPT_CHARS = 200  # the end of a prompt (where the question is; HH prompts are whole dialogues)
RESPONSE_CHARS = 300  # the start of a response


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(model: str, figures: dict) -> str:
    """The per-set text summary (the first table `rewardserve audit` prints)."""
    length, probe, cal = figures["length"], figures["perturbation"], figures["calibration"]
    pref = figures.get("preference_calibration") or {}
    rows = [
        ("pairs", str(figures["pairs"])),
        ("accuracy", _fmt(figures["accuracy"])),
        (f"accuracy, chosen shorter ({figures['pairs_chosen_shorter']})", _fmt(figures["accuracy_chosen_shorter"])),
        (f"accuracy, chosen longer ({figures['pairs_chosen_longer']})", _fmt(figures["accuracy_chosen_longer"])),
        ("longer-wins baseline", _fmt(figures["longer_wins_baseline"])),
        ("mean confidence, sigma(margin)", _fmt(pref.get("mean_confidence"))),
        (f"ECE ({pref.get('bins', '-')} bins), T = 1", _fmt(pref.get("ece"))),
        (f"ECE at T = {pref.get('temperature', 1.0):.3g}", _fmt(pref.get("ece_at_temperature"))),
        ("slope, z per 100 tokens", _fmt(length["slope_z_per_100_tokens"], "+.3f")),
        ("Spearman(score, length)", _fmt(length["spearman"], "+.3f")),
        ("mean dz, padded with filler", _fmt(probe.get("mean_dz_padded"), "+.3f")),
        ("mean dz, truncated to half", _fmt(probe.get("mean_dz_truncated"), "+.3f")),
        ("share above calibration p99", _fmt(cal["share_above_p99"])),
        ("share below calibration p1", _fmt(cal["share_below_p1"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"audit of {model}"] + [f"  {k:<{width}}  {v:>8}" for k, v in rows])


def sets_table(rows: Sequence[dict]) -> str:
    """One line per evaluation set, side by side, so that distribution shift shows (audit.set_row)."""
    head = (f"{'set':<28} {'pairs':>6} {'accuracy':>8} {'95% CI':>13} {'longer-wins':>11} {'conf':>6} "
            f"{'ECE':>6} {'ECE@T':>6} {'rho(len)':>8}")
    lines = [head]
    for r in rows:
        ci = "-" if r["accuracy_ci95"] is None else f"{r['accuracy_ci95'][0]:.3f}-{r['accuracy_ci95'][1]:.3f}"
        lines.append(f"{r['set'][:28]:<28} {r['pairs']:>6} {_fmt(r['accuracy']):>8} {ci:>13} "
                     f"{_fmt(r['longer_wins_baseline']):>11} {_fmt(r['mean_confidence']):>6} {_fmt(r['ece']):>6} "
                     f"{_fmt(r['ece_at_temperature']):>6} {_fmt(r['length_spearman'], '+.3f'):>8}")
    return "\n".join(lines)


def probes_table(probes: dict) -> str:
    """The hack probes (service/probes.run_probes): mean change in z and share of flipped rankings when the
    probe edits the rejected response, and separately the chosen one."""
    lines = [f"{'probe':<28} {'rejected: mean dz':>17} {'flips':>6} {'chosen: mean dz':>15} {'flips':>6}"]
    for name, sides in probes.items():
        if name == "sycophancy":
            lines.append(f"sycophancy ({sides.get('n')} items): agree preferred over a polite correction "
                         f"{_fmt(sides.get('agree_preferred_share'))}, mean dz agree - disagree "
                         f"{_fmt(sides.get('mean_dz_agree_minus_disagree'), '+.3f')}")
            continue
        if not isinstance(sides, dict) or not ("rejected" in sides or "chosen" in sides):
            continue
        rej, cho = sides.get("rejected") or {}, sides.get("chosen") or {}
        lines.append(f"{name[:28]:<28} {_fmt(rej.get('mean_dz'), '+.3f'):>17} {_fmt(rej.get('flip_share')):>6} "
                     f"{_fmt(cho.get('mean_dz'), '+.3f'):>15} {_fmt(cho.get('flip_share')):>6}")
    return "\n".join(lines)


def picture(by_set: dict[str, dict], rows: Sequence[dict], probes: dict | None, path: Path, title: str) -> None:
    """audit.png, two rows of three panels, every set in its own colour: score vs length, accuracy by length
    gap, z histogram; the reliability diagram (at T = 1 solid, at the bundle's T dashed when T != 1),
    accuracy with its 95 % interval against the longer-wins baseline, and the hack probes' mean dz."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8), dpi=80)
    names = list(by_set)
    for i, name in enumerate(names):
        fig_s, colour = by_set[name], f"C{i % 10}"
        pts = fig_s["_points"]
        axes[0, 0].scatter(pts["tokens"], pts["z"], s=3, alpha=0.3, color=colour)
        if fig_s["length"]["slope_z_per_100_tokens"] is not None:
            k, b = np.polyfit(pts["tokens"], pts["z"], 1)
            xs = np.array([pts["tokens"].min(), pts["tokens"].max()])
            axes[0, 0].plot(xs, k * xs + b, color=colour, label=f"{name}: {k * 100:+.2f} z/100 tok, "
                            f"rho {fig_s['length']['spearman'] or 0:+.2f}")
        buckets = fig_s["accuracy_by_length_difference"]
        width = 0.8 / len(names)
        axes[0, 1].bar(np.arange(len(buckets)) + (i - (len(names) - 1) / 2) * width,
                       [b["accuracy"] or 0 for b in buckets], width=width, color=colour, label=name)
        hist = fig_s["calibration"]["z_histogram"]
        axes[0, 2].stairs(np.asarray(hist["counts"]) / max(1, sum(hist["counts"])), hist["edges"], color=colour,
                          label=name)
        pref = fig_s["preference_calibration"]
        for key, style in (("reliability", "-"), ("reliability_at_temperature", "--")):
            if key.endswith("temperature") and abs(pref["temperature"] - 1.0) < 1e-9:
                continue
            bins = [b for b in pref[key] if b["pairs"]]
            axes[1, 0].plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, marker="o",
                            ms=3, color=colour, label=f"{name}" + (f" (T={pref['temperature']:.2f})"
                                                                    if style == "--" else f", ECE {pref['ece']:.3f}"))
    axes[0, 0].set(xlabel="response tokens", ylabel="score (z)", title="score vs length")
    axes[0, 0].legend(loc="best", fontsize=6)
    axes[0, 1].axhline(0.5, color="grey", lw=0.8, ls="--")
    labels = [b["bucket"] for b in by_set[names[0]]["accuracy_by_length_difference"]]
    axes[0, 1].set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    axes[0, 1].set(ylim=(0, 1.05), xlabel="chosen − rejected tokens", ylabel="accuracy", title="accuracy by length gap")
    axes[0, 2].set(xlabel="score (z, clipped to ±4)", ylabel="share of responses", title="score histogram")
    axes[0, 2].legend(loc="best", fontsize=6)
    ax = axes[1, 0]
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", lw=0.8, ls=":")
    ax.set(xlim=(0.5, 1.0), ylim=(0, 1.02), xlabel="confidence of the predicted side", ylabel="accuracy",
           title="reliability (dashed: at the bundle's T)")
    ax.legend(loc="best", fontsize=6)
    ax = axes[1, 1]
    xs = np.arange(len(rows))
    acc = np.array([r["accuracy"] or 0 for r in rows])
    lo = np.array([r["accuracy_ci95"][0] if r["accuracy_ci95"] else a for r, a in zip(rows, acc)])
    hi = np.array([r["accuracy_ci95"][1] if r["accuracy_ci95"] else a for r, a in zip(rows, acc)])
    ax.bar(xs, acc, color=[f"C{i % 10}" for i in range(len(rows))], yerr=[acc - lo, hi - acc], capsize=3)
    ax.scatter(xs, [r["longer_wins_baseline"] or 0 for r in rows], marker="_", s=400, color="k",
               label="longer wins", zorder=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, [r["set"] for r in rows], rotation=20, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="accuracy (95 % Wilson)", title="accuracy per set vs longer-wins")
    ax.legend(loc="best", fontsize=7)
    ax = axes[1, 2]
    if probes:
        pnames = [p for p, v in probes.items() if isinstance(v, dict) and ("rejected" in v or "chosen" in v)]
        ys = np.arange(len(pnames))
        for j, side in enumerate(("rejected", "chosen")):
            vals = [(probes[p].get(side) or {}).get("mean_dz") or 0.0 for p in pnames]
            ax.barh(ys + (j - 0.5) * 0.4, vals, height=0.4, label=f"edit on {side}")
        if "sycophancy" in probes:
            pnames.append("sycophancy: agree − disagree")
            ys = np.arange(len(pnames))
            ax.barh([ys[-1]], [probes["sycophancy"].get("mean_dz_agree_minus_disagree") or 0.0], height=0.4,
                    color="C3")
        ax.set_yticks(ys, pnames, fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.legend(loc="best", fontsize=7)
        ax.set(xlabel="mean change of z", title=f"hack probes ({names[0]})")
    else:
        pr = by_set[names[0]]["perturbation"]
        vals = [pr.get("mean_dz_padded") or 0.0, pr.get("mean_dz_truncated") or 0.0]
        ax.barh([0, 1], vals, color=["C1", "C2"])
        ax.set_yticks([0, 1], ["padded with filler", "truncated to half"], fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(xlabel="mean change of z", title=f"perturbation probes ({names[0]})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def shorten(text: str, limit: int, keep: str = "start") -> str:
    """One line of at most about `limit` characters: newlines shown as ⏎, markdown table pipes escaped;
    `keep` the start (a response) or the end (a prompt, whose last turn holds the question)."""
    flat = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    if len(flat) > limit:
        flat = ("…" + flat[-limit:]) if keep == "end" else (flat[:limit] + "…")
    return flat.replace("|", "\\|")


def examples_markdown(model: str, sets: dict[str, tuple[Sequence[PreferencePair], np.ndarray, np.ndarray]],
                      temperature: float) -> str:
    """audit_examples.md: per set, the EXAMPLES highest- and lowest-scored responses and the EXAMPLES most
    confidently misranked pairs (largest σ((r_rejected − r_chosen) / T), rejected strictly above chosen).
    `sets`: name -> (pairs, raw scores of chosen then rejected, their z-scores)."""
    out = [f"# Examples to read: {model}", "",
           f"Scores are the bundle's z-scores (raw in brackets); prompts show their last {PROMPT_CHARS} "
           f"characters, responses their first {RESPONSE_CHARS}; ⏎ is a line break. P = σ((r_rejected − "
           f"r_chosen) / T) with T = {temperature:.3g}: the model's probability that the rejected response is "
           "the better one.", ""]
    for name, (pairs, raw, z) in sets.items():
        n = len(pairs)
        out += [f"## {name} ({n} pairs)", ""]
        for title, order in (("highest-scored responses", np.argsort(-raw, kind="stable")[:EXAMPLES]),
                             ("lowest-scored responses", np.argsort(raw, kind="stable")[:EXAMPLES])):
            out += [f"### {min(EXAMPLES, len(raw))} {title}", "", "| # | z | side | prompt (end) | response |",
                    "|---|---|---|---|---|"]
            for rank_, i in enumerate(order, 1):
                pair, side = pairs[i % n], ("chosen" if i < n else "rejected")
                text = pair.chosen if side == "chosen" else pair.rejected
                out.append(f"| {rank_} | {z[i]:+.3f} ({raw[i]:.4g}) | {side} | {shorten(pair.prompt, PROMPT_CHARS, 'end')}"
                           f" | {shorten(text, RESPONSE_CHARS)} |")
            out.append("")
        margins = raw[:n] - raw[n:]
        wrong = [i for i in np.argsort(margins, kind="stable") if margins[i] < 0][:EXAMPLES]
        out += [f"### {len(wrong)} most confidently misranked pairs", "",
                "| # | P | z chosen | z rejected | prompt (end) | chosen | rejected |", "|---|---|---|---|---|---|---|"]
        for rank_, i in enumerate(wrong, 1):
            p = pairs[i]
            prob = 1.0 / (1.0 + np.exp(margins[i] / temperature))
            out.append(f"| {rank_} | {prob:.3f} | {z[i]:+.3f} | {z[n + i]:+.3f} | {shorten(p.prompt, PROMPT_CHARS, 'end')}"
                       f" | {shorten(p.chosen, RESPONSE_CHARS)} | {shorten(p.rejected, RESPONSE_CHARS)} |")
        out.append("")
    return "\n".join(out)
