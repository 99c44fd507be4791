"""Tables on screen, JSON, PNGs and the HTML section of the redundancy report (saescope report includes it)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from saescope.core.files import atomic_write_bytes, atomic_write_json
from saescope.core.render import figure, html_table, png


def _rhat_rows(res: dict) -> list[list]:
    """Per benchmark at the chosen layer: name, prompts, R_hat mean, 5%, 95%, |F(D)| (then the control's R_hat, |F(D)|)."""
    layer, sets = str(res["layer"]), res["sets"]
    rows = []
    for b in res["benchmarks"]:
        r = sets["sae"][layer]["r_hat"][b]
        row = [b, res["n_prompts"][b], r["mean"], r["p5"], r["p95"], sets["sae"][layer]["footprint"][b]]
        if "control" in sets:
            row += [sets["control"][layer]["r_hat"][b]["mean"], sets["control"][layer]["footprint"][b]]
        rows.append(row)
    return rows


def _near_init_warning(res: dict) -> str | None:
    layer = str(res["layer"])
    cos = res.get("decoder_cos_to_init", {}).get(layer)
    if cos is None or cos <= 0.9:
        return None
    return (f"the layer {layer} decoders are still {cos:.3f} cosine to their random initialisation: these SAEs are close "
            "to the control; train longer before reading these figures as evidence about learned features")


def format_report(res: dict, *, top: int = 15) -> str:
    layer = str(res["layer"])
    sets = res["sets"]
    lines = [f"layer {layer}, pool {res['pool']}: R_hat (mean over random orders, 5-95% band), footprint size"]
    head = f"{'benchmark':<22} {'prompts':>7} {'R_hat':>7} {'band':>15} {'|F(D)|':>7}"
    if "control" in sets:
        head += f"   {'ctl R_hat':>9} {'ctl |F|':>7}"
    lines.append(head)
    for b, n, mean, p5, p95, f, *ctl in _rhat_rows(res):
        row = f"{b:<22} {n:>7} {mean:>7.3f} {p5:>7.3f}-{p95:<7.3f} {f:>7}"
        if ctl:
            row += f"   {ctl[0]:>9.3f} {ctl[1]:>7}"
        lines.append(row)
    if "control_agreement" in res:
        ag = res["control_agreement"][layer]
        lines.append(f"control vs trained SAEs at layer {layer}: overlaps Pearson {ag['overlap_pearson']:+.3f}, "
                     f"R_hat Spearman {ag['r_hat_spearman']:+.3f} (near 1: the SAE is not what these figures measure)")
    if warning := _near_init_warning(res):
        lines.append(f"warning: {warning}")
    lines.append(f"\nmost-contained pairs (size-matched{', control in brackets' if 'control' in sets else ''}):")
    for s in res["statements"][:top]:
        ctl = f" [control {100 * s['control_matched']:.0f}%]" if s["control_matched"] is not None else ""
        lines.append(f"  {s['text']}{ctl}")
    lines.append(f"\nsubsumed (A inside B >= {res['subsume_threshold']:.2f} size-matched, and 5 points more than B inside A): "
                 + (", ".join(f"{d['a']} in {d['b']} ({100 * d['matched']:.0f}%)" for d in res["drop"]) or "none"))
    lines.append("near-duplicates (both directions above the threshold): "
                 + (", ".join(f"{d['a']} ~ {d['b']}" for d in res["mutual"]) or "none"))
    return "\n".join(lines)


def _heatmaps(res: dict, key: str, title: str, save_to: Path) -> str:
    layer = str(res["layer"])
    names = res["benchmarks"]
    sets = list(res["sets"])
    fig, axes = figure(len(sets), width=0.42 * len(names) + 2.5, height=0.38 * len(names) + 1.5)
    for ax, which in zip(axes, sets):
        e = res["sets"][which][layer]
        m = np.array(e["matched"][key] if key != "raw" else e["overlap"], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(title=f"{title} ({which})", xlabel="B", ylabel="A")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5, color="w" if m[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=axes[-1], fraction=0.04)
    return png(fig, save_to)


def write_report(res: dict, out: Path) -> str:
    """redundancy.json, the PNGs and report-section.html in `out`; returns the HTML section."""
    atomic_write_json(out / "redundancy.json", res)
    layer = str(res["layer"])
    parts = [f"<h2>Benchmark redundancy</h2><p class='note'>Footprints of {len(res['benchmarks'])} benchmarks "
             f"(pool: {html.escape(res['pool'])}), layer {layer} unless said otherwise; data in redundancy.json. "
             "Overlap A→B = |F(A) ∩ F(B)| / |F(A)|: the share of A's features that B also turns on. Size-matched: both "
             "sides subsampled to the same number of prompts, 20 times (a larger benchmark has a larger footprint by size "
             "alone).</p>"]
    parts.append(_heatmaps(res, "overlap", "overlap A→B, size-matched", out / f"overlap-matched-L{layer}.png"))
    parts.append(_heatmaps(res, "raw", "overlap A→B, raw", out / f"overlap-raw-L{layer}.png"))
    fig, axes = figure(2)
    for b in res["benchmarks"]:
        c = res["sets"]["sae"][layer]["coverage"][b]
        axes[0].plot(np.array(c["n"]) / c["n"][-1], c["c"], lw=1, label=b)
        axes[1].plot([int(n) for n in res["sets"]["sae"]], [e["r_hat"][b]["mean"] for e in res["sets"]["sae"].values()], lw=1)
    axes[0].set(xlabel="share of prompts n / N", ylabel="coverage c_n", title=f"coverage curves, layer {layer}")
    axes[1].set(xlabel="layer", ylabel="R_hat", title="R_hat per layer (trained SAEs)")
    axes[0].legend(fontsize=5, ncol=2)
    parts.append(png(fig, out / "coverage.png"))
    head = ["benchmark", "prompts", "R_hat", "5%", "95%", "|F(D)|"]
    parts.append(html_table(head + (["control R_hat", "control |F(D)|"] if "control" in res["sets"] else []), _rhat_rows(res)))
    if warning := _near_init_warning(res):
        parts.append(f"<p class='missing'>{html.escape(warning[0].upper() + warning[1:])}.</p>")
    if "control_agreement" in res:
        ag = res["control_agreement"]
        fig, (ax,) = figure(1)
        ax.plot([int(n) for n in ag], [a["overlap_pearson"] for a in ag.values()], "o-", ms=3, label="overlaps (Pearson)")
        ax.plot([int(n) for n in ag], [a["r_hat_spearman"] for a in ag.values()], "s--", ms=3, label="R_hat (Spearman)")
        ax.set(xlabel="layer", ylabel="agreement", ylim=(-1, 1), title="control vs trained SAEs")
        ax.legend(fontsize=7)
        parts.append("<p>How closely the control reproduces the trained SAEs' figures, per layer. Near 1, the "
                     "redundancy figures come from the model's activations, not from what the SAE learned.</p>"
                     + png(fig, out / "control-agreement.png"))
    parts.append("<h3>Containment statements (size-matched)</h3><ul>" + "".join(
        f"<li>{html.escape(s['text'])}"
        + (f" — control: {100 * s['control_matched']:.0f}%" if s["control_matched"] is not None else "") + "</li>"
        for s in res["statements"][:20]) + "</ul>")
    parts.append(f"<h3>Subsumed benchmarks (candidates to drop)</h3><p class='note'>A is listed when at least "
                 f"{100 * res['subsume_threshold']:.0f}% of its size-matched footprint lies inside B and clearly more than "
                 "the reverse; near-duplicates are pairs above the threshold both ways.</p><p>" + (html.escape(", ".join(
                     f"{d['a']} ({100 * d['matched']:.0f}% inside {d['b']})" for d in res["drop"])) or "none at this threshold")
                 + "</p><p>Near-duplicates: " + (html.escape(", ".join(f"{d['a']} ~ {d['b']}" for d in res["mutual"])) or "none")
                 + "</p>")
    section = "\n".join(parts)
    atomic_write_bytes(out / "report-section.html", section.encode())
    return section


def _num(v: float | None, spec: str) -> str:
    """A figure, or 'n/a' where it does not exist (None in compare.json: no spread to correlate)."""
    return "n/a" if v is None else format(v, spec)


def format_compare(cmp: dict) -> str:
    lines = [f"layer {cmp['layer']}"]
    for which, r in cmp["r_vs_rhat"].items():
        lines.append(f"R_hat vs R ({which}): Spearman {_num(r['spearman'], '+.3f')} (permutation p = {_num(r['p_value'], '.3f')}) over "
                     f"{len(r['benchmarks'])} benchmarks")
        for b, g, x, y in zip(r["benchmarks"], r["granularity"], r["R_hat"], r["R"]):
            lines.append(f"  {b:<18} R_hat {x:.3f}  R {y:.3f}  ({g} granularity)")
    if cmp.get("r_vs_rhat_missing"):
        lines.append("no footprint for: " + ", ".join(cmp["r_vs_rhat_missing"]))
    lines += [f"note: {n}" for n in cmp.get("notes", [])]
    lost = {k: v for k, v in cmp.get("pair_models_dropped_for_nan", {}).items() if v}
    if lost:
        lines.append(f"score pairs: models dropped for a missing score in {len(lost)} of {len(cmp['pair_models_dropped_for_nan'])} "
                     f"pairs ({min(lost.values())}-{max(lost.values())} models each; per pair in compare.json)")
    for key, p in cmp["pairs"].items():
        part = (f"; MMLU partialled out ({p['partial_pairs']} pairs): Pearson {_num(p['pearson_partial_mmlu'], '+.3f')}, "
                f"Spearman {_num(p['spearman_partial_mmlu'], '+.3f')}") if p["pearson_partial_mmlu"] is not None else ""
        lines.append(f"feature overlap vs score correlation ({key}, {p['n_pairs']} pairs): Pearson {_num(p['pearson'], '+.3f')}, "
                     f"Spearman {_num(p['spearman'], '+.3f')} (p = {_num(p['p_value_spearman'], '.3f')}){part}")
    return "\n".join(lines)


def write_compare(cmp: dict, out: Path) -> None:
    atomic_write_json(out / "compare.json", cmp)
    parts = ["<h3>Checked against performance data</h3>"]
    if cmp["r_vs_rhat"]:
        fig, axes = figure(len(cmp["r_vs_rhat"]))
        for ax, (which, r) in zip(axes, cmp["r_vs_rhat"].items()):
            ax.scatter(r["R_hat"], r["R"])
            for b, x, y in zip(r["benchmarks"], r["R_hat"], r["R"]):
                ax.annotate(b, (x, y), fontsize=6)
            ax.set(xlabel="R_hat (features)", ylabel="R (performance)",
                   title=f"{which}: Spearman {_num(r['spearman'], '+.2f')}, p={_num(r['p_value'], '.2f')}")
        parts.append(png(fig, out / "compare-r.png"))
    if cmp["pairs"]:
        sc = [p["score_pearson"] for p in cmp["pair_scores"]]
        keys = [k for k in cmp["pairs"] if k.endswith("/matched")]
        fig, axes = figure(len(keys))
        for ax, key in zip(axes, keys):
            p = cmp["pairs"][key]
            ax.scatter([np.nan if v is None else v for v in p["overlap"]], sc, s=10)
            ax.set(xlabel="symmetric feature overlap (size-matched)", ylabel="score correlation across models",
                   title=f"{key.split('/')[0]}: Pearson {_num(p['pearson'], '+.2f')}")
        parts.append(png(fig, out / "compare-pairs.png"))
    parts.append("<pre>" + html.escape(format_compare(cmp)) + "</pre>")
    atomic_write_bytes(out / "report-section_compare.html", "\n".join(parts).encode())
