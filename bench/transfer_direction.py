"""The report's direction, read off a transfer matrix: do rules mined on English data score higher on European
languages than on Arabic, Chinese and Hindi? (Qwen-Scope's report: English-mined features transfer well to ru, fr, es
and poorly to ar, zh, am.) Reads the JSON of `saescope toxicity eval --transfer ...` and prints, for each English
mining set, every target's balanced accuracy for the SAE's rule, the random control's same rule, the residual probe
and the bag of words, beside the target's own in-language figure (what a rule mined in that language reaches: a
target nothing learns in-language cannot be a transfer target), and the means of the two language groups.

    python bench/transfer_direction.py RUN/toxicity/eval-transfer-mhc.json --rule both-k10 [--json out.json]

Sets count as European by their language code (the matrix's `languages`); English sets are the rows, every other
set the columns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saescope.core.data.labelled import builtin_definition, builtin_language, builtin_name

EUROPEAN = ("de", "es", "fr", "it", "nl", "pl", "pt", "ru")
FAR = ("ar", "zh", "hi", "am", "ja", "ko")
METHODS = ("sae", "control", "probe", "lexical")


def balanced(matrix: dict, method: str, source: str, target: str, rule: str) -> float | None:
    """One cell's balanced accuracy: a rule's for the SAE and control, the baseline's own for the others."""
    cell = matrix.get(method, {}).get(source, {}).get(target)
    if cell is None:
        return None
    got = cell["balanced_accuracy"]
    return got.get(rule) if isinstance(got, dict) else got


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def direction(matrix: dict, rule: str) -> dict:
    """Per English source: per target, each method's transfer and in-language figure; the group means."""
    # matrices written before `languages` was recorded: the built-in sets' own
    languages = matrix.get("languages") or {s: builtin_language(builtin_name(s)) if builtin_name(s) else ""
                                           for s in matrix["sae"]}
    sources = [s for s, lang in languages.items() if lang == "en"]
    targets = [t for t, lang in languages.items() if lang in EUROPEAN + FAR]
    definitions = matrix.get("definitions") or {s: builtin_definition(builtin_name(s) or s) for s in matrix["sae"]}
    out: dict = {"rule": rule, "definitions": definitions, "languages": languages, "sources": {}}
    for source in sources:
        rows = {t: {"language": languages[t],
                    **{m: balanced(matrix, m, source, t, rule) for m in METHODS},
                    **{f"{m}_in_language": balanced(matrix, m, t, t, rule) for m in METHODS}} for t in targets}
        groups = {}
        for name, codes in (("european", EUROPEAN), ("far", FAR)):
            chosen = [r for r in rows.values() if r["language"] in codes]
            groups[name] = {m: _mean([r[m] for r in chosen if r[m] is not None]) for m in METHODS}
            groups[name]["n_targets"] = len(chosen)
        out["sources"][source] = {"targets": rows, "groups": groups}
    return out


def show(result: dict) -> str:
    fmt = lambda v: f"{v:6.3f}" if v is not None else f"{'-':>6}"  # noqa: E731
    lines = [f"rule {result['rule']}; balanced accuracy, transferred (in-language)"]
    for source, got in result["sources"].items():
        lines.append(f"mined on {source} ({result['definitions'].get(source, '?')})")
        lines.append(f"{'target':<22} " + " ".join(f"{m:>15}" for m in METHODS))
        for target, r in got["targets"].items():
            lines.append(f"{target + ' (' + r['language'] + ')':<22} "
                         + " ".join(f"{fmt(r[m])} ({fmt(r[m + '_in_language'])})" for m in METHODS))
        for name, g in got["groups"].items():
            lines.append(f"{'mean, ' + name + ' (' + str(g['n_targets']) + ')':<22} "
                         + " ".join(f"{fmt(g[m])}{'':>9}" for m in METHODS))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_json", help="the JSON `saescope toxicity eval --transfer` wrote")
    ap.add_argument("--rule", default="both-k10", help="the SAE's and control's rule (a generic name: family-kK)")
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()
    matrix = json.loads(Path(args.eval_json).read_text())["transfer"]
    result = direction(matrix, args.rule)
    print(show(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
