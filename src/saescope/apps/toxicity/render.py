"""The toxicity section of a run's HTML report (`saescope report` includes RUN/toxicity/report-section.html): the
rules' F1 beside the control and the baselines, the transfer matrix, and the audit log, where a reviewer opens any
decision to see the features that fired, on which tokens, and what those features are."""

from __future__ import annotations

import html
from pathlib import Path

from saescope.api.rules import generic_name
from saescope.apps.toxicity.evaluate import label_definitions, pair_groups
from saescope.core.data.rows import iter_rows
from saescope.core.files import atomic_write_bytes, read_json
from saescope.core.render import html_table

MAX_DECISIONS = 5000  # every decision of a HateCheck-sized log; a larger log shows its first 5,000, positives first


def _results(result: dict) -> str:
    sae, control = result["sets"]["sae"], result["sets"].get("control", {"rules": {}})
    ctl = {generic_name(n): v for n, v in control["rules"].items()}
    rows = []
    for name, r in sae["rules"].items():
        c = ctl.get(generic_name(name))
        feats = ", ".join(f"L{layer}/{f}" for layer, f, _ in r["features"])
        rows.append([name, r["f1"], r["precision"], r["recall"], r["balanced_accuracy"], c["f1"] if c else "-",
                     c["balanced_accuracy"] if c else "-", feats])
    for name, b in result["baselines"].items():
        rows.append([name + (f" (layer {b['layer']})" if "layer" in b else ""), b["f1"], b["precision"], b["recall"],
                     b["balanced_accuracy"], "", "", ""])
    out = [f"<p class='note'>Mined on {html.escape(result['mining']['source'])} ({result['mining']['n_texts']} texts), "
           f"evaluated on {html.escape(result['evaluation']['source'])} ({result['evaluation']['n_texts']} texts): "
           f"{html.escape(result['split'])}.</p>",
           html_table(["rule", "F1", "precision", "recall", "balanced accuracy", "control F1", "control bal. acc.",
                       "features (layer/id)"], rows)]
    default = next(iter(sae["rules"].values()))
    funcs = default.get("functionality") or {}
    if funcs:
        out.append(f"<p>Where the {html.escape(next(iter(sae['rules'])))} rule fails, per HateCheck functionality:</p>")
        out.append(html_table(["functionality", "label", "n", "accuracy"],
                              [[k, v["label"], v["n"], v["accuracy"]] for k, v in sorted(funcs.items(), key=lambda kv: kv[1]["accuracy"])]))
    transfer = result.get("transfer")
    if transfer:
        langs = list(transfer["sae"])
        rule = "layer-k5" if "layer-k5" in transfer["sae"][langs[0]][langs[0]]["f1"] else "layer-k1"
        out.append(f"<p>Transfer matrix: balanced accuracy (0.5 = a constant answer) of the {rule} rule mined on the "
                   "row's language, evaluated on the column's (SAE / control).</p>")
        ctl = transfer.get("control", {})
        m = "balanced_accuracy"
        cell = lambda s, t: f"{transfer['sae'][s][t][m][rule]:.3f} / {ctl.get(s, {}).get(t, {}).get(m, {}).get(rule, float('nan')):.3f}"  # noqa: E731
        out.append(html_table(["mined on"] + langs, [[s] + [cell(s, t) for t in langs] for s in langs]))
        out.append(by_definition_table(transfer, rule))
    for other in result.get("also", {}).values():
        out.append(_results(other))
    return "\n".join(out)


def by_definition_table(transfer: dict, rule: str) -> str:
    """The transfer pairs' mean balanced accuracy where mining and scored sets share their label definition and where
    they differ (`by_definition`), then split by language where the matrix has two sets of a language
    (`by_language_and_definition`); "" when the matrix has no such groups."""
    nan = float("nan")
    out = []
    for title, groups in pair_groups(transfer):
        rows = [[g, v["pairs"], v.get("sae", {}).get(rule, nan), v.get("control", {}).get(rule, nan),
                 v.get("probe", nan), v.get("lexical", nan)] for g, v in groups.items()]
        out.append(f"<p>Transfer pairs (mined on one set, scored on another) by {title} "
                   f"({html.escape(label_definitions(transfer))}): mean balanced accuracy.</p>"
                   + html_table(["pairs", "n", f"SAE {rule}", "control", "residual probe", "bag of words"], rows))
    return "\n".join(out)


def _decisions(audit: list[dict]) -> str:
    shown = sorted(audit, key=lambda r: r["decision"] != "positive")[:MAX_DECISIONS]
    out = [f"<p>Audit log: {len(audit)} decisions ({sum(r['decision'] == 'positive' for r in audit)} positive); "
           f"{len(shown)} shown, positives first. Open one to see why.</p>"]
    for r in shown:
        body = []
        for f in r["fired"]:
            toks = ", ".join(f"{html.escape(repr(t['token']))} @{t['position']} ({t['activation']:.2f})" for t in f["tokens"])
            ev = f.get("evidence")
            extra = ""
            if ev:
                extra = (f"<br><span class='note'>promotes {html.escape(', '.join(map(repr, ev['promoted'][:8])))}; "
                         f"top contexts: {html.escape(' | '.join(c[:80] for c in ev['contexts']))}</span>")
            weight = f" weight {f['weight']:+.3f}," if "weight" in f else ""
            if "terms" in f:  # a rule over both statistics: what each statistic read of this feature adds
                weight += "".join(f" weight {t['weight']:+.3f} x {t['statistic']} activation {t['activation']:.3f} "
                                  f"per {t['scale']:.3f} adds {t['contribution']:+.3f};" for t in f["terms"])
                weight += f" together {f['contribution']:+.3f},"
            elif "contribution" in f:  # a weighted or mean rule: what this feature's strength adds to the score
                stat = "max" if "max_activation" in f else "mean"
                weight += (f" {stat} activation {f[stat + '_activation']:.3f} per {f['scale']:.3f}: adds "
                           f"{f['contribution']:+.3f},")
            body.append(f"<li>layer {f['layer']} feature {f['feature']} (delta {f['delta']:+.3f}){weight} fired on {toks}"
                        f"{extra}</li>")
        score = f" (score {r['score']:+.3f})" if "score" in r else ""
        summary = f"#{r['index']} {r['decision']}{score}: {html.escape(r['text'][:120])}"
        out.append(f"<details><summary>{summary}</summary><ul>{''.join(body) or '<li>no feature fired</li>'}</ul>"
                   f"<span class='note'>rule {html.escape(r['rule'])}, rules fingerprint {html.escape(r['rules_fingerprint'])}"
                   f"</span></details>")
    return "\n".join(out)


def write_eval_section(result: Path) -> Path:
    """report-section-STEM.html beside an evaluation written under another name than eval.json (`toxicity eval --json
    RULES_FOLDER/STEM.json`, e.g. a transfer matrix over other sets), so that the run's report shows it too."""
    out = result.with_name(f"report-section-{result.stem}.html")
    atomic_write_bytes(out, (f"<h2>Toxicity rules: {html.escape(result.name)}</h2>\n" + _results(read_json(result))).encode())
    return out


def write_section(folder: Path) -> Path:
    """FOLDER/report-section.html from FOLDER/eval.json and FOLDER/audit.jsonl, whichever exist."""
    parts = ["<h2>Toxicity rules</h2>"]
    eval_path, audit_path = folder / "eval.json", folder / "audit.jsonl"
    if eval_path.is_file():
        parts.append(_results(read_json(eval_path)))
    if audit_path.is_file():
        parts.append(_decisions([row for _, row in iter_rows(audit_path)]))
    out = folder / "report-section.html"
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out
