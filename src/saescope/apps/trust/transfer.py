"""Transfer: do SAEs trained on one checkpoint still fit another (base -> instruct, before -> after a
fine-tune)? Per layer the same evaluation on both models, and the features whose firing frequency
shifts most between them.
"""

from __future__ import annotations

import math

from saescope.api.evaluate import as_records, evaluate
from saescope.api.scope import check_fit
from saescope.core.models import LoadedModel
from saescope.core.sae import SAE

FIGURES = ("fvu", "l0", "dead_frac", "ce_recovered", "kl")


def transfer_report(saes: dict[int, SAE], source: LoadedModel, target: LoadedModel, *, n_shifted: int = 10,
                    **eval_kw) -> dict:
    """Evaluate `saes` on the model they were trained on (`source`) and on `target`, on the same held-out text."""
    for lm in (source, target):
        check_fit(lm, saes)
    on_source = evaluate(source, saes, **eval_kw)
    on_target = evaluate(target, saes, **eval_kw)
    layers = []
    for s, t in zip(on_source, on_target):
        shift = t.feature_freq - s.feature_freq
        top = shift.abs().argsort(descending=True)[:n_shifted]
        layers.append({
            "layer": s.layer,
            **{f"{f}_source": getattr(s, f) for f in FIGURES},
            **{f"{f}_target": getattr(t, f) for f in FIGURES},
            "fvu_ratio": t.fvu / s.fvu if s.fvu > 0 else math.nan,
            "freq_shift_l1": float(shift.abs().sum()),
            "shifted": [{"feature": int(i), "freq_source": float(s.feature_freq[i]), "freq_target": float(t.feature_freq[i])}
                        for i in top.tolist()],
        })
    data = eval_kw.get("data")
    data = f"{data} ({eval_kw['text_column']})" if data and eval_kw.get("text_column") else data
    return {"source": source.name, "target": target.name, "data": str(data or "embedded corpus"), "layers": layers,
            "eval_source": as_records(on_source), "eval_target": as_records(on_target)}


def format_transfer(report: dict) -> str:
    head = (f"{'layer':>5} {'FVU src':>8} {'FVU tgt':>8} {'L0 src':>7} {'L0 tgt':>7} {'dead src':>8} {'dead tgt':>8} "
            f"{'CErec src':>9} {'CErec tgt':>9}  most shifted feature (freq src -> tgt)")
    rows = [head]
    for r in report["layers"]:
        top = r["shifted"][0] if r["shifted"] else None
        shifted = f"{top['feature']} ({top['freq_source']:.4f} -> {top['freq_target']:.4f})" if top else "-"
        rows.append(f"{r['layer']:>5} {r['fvu_source']:8.4f} {r['fvu_target']:8.4f} {r['l0_source']:7.1f} {r['l0_target']:7.1f} "
                    f"{r['dead_frac_source']:8.3f} {r['dead_frac_target']:8.3f} {r['ce_recovered_source']:9.3f} "
                    f"{r['ce_recovered_target']:9.3f}  {shifted}")
    return "\n".join(rows)
