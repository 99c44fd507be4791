"""`saescope eval | report`: per-layer figures of a set of SAEs (beside a random control), and a run's HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import add_sae_flags, layer_list, writes
from saescope.io import RunDir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FVU, L0, dead/dense fractions and CE recovered per layer")
    add_sae_flags(p)
    p.add_argument("--data", help="text file, folder or hub dataset id (default: the embedded corpus's held-out split)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--outlier-factor", type=float, default=5.0)
    writes(p, "--out", folder=True, help="folder for eval.json (default: the SAE folder)")
    p.add_argument("--control", help="a random control (saescope control random): its figures beside the SAEs'")

    p = sub.add_parser("report", help="a self-contained HTML page: training, evaluation, trust checks")
    p.add_argument("--sae", required=True, help="the run folder")
    writes(p, "--out", folder=False, help="HTML file (default: SAE/report.html)")


def evaluate_and_print(lm, saes: dict, path: Path, control: dict | None = None, **settings) -> None:
    """Evaluate `saes` (and `control`) with `settings` (saescope.evaluate.evaluate_sets), print the table and merge
    the figures into the eval file at PATH."""
    from saescope.evaluate import evaluate_sets, format_comparison, format_table, read_results, write_results

    read_results(path)  # a file the results could not merge into is refused before the work
    sets = {"sae": saes} if control is None else {"sae": saes, "control": control}
    results = evaluate_sets(lm, sets, **settings)
    print(format_table(results["sae"]) if control is None else format_comparison(results["sae"], results["control"]))
    recorded = {"model": lm.name, **{k: v for k, v in settings.items() if k != "data"}, "data": settings.get("data") or "default"}
    written = write_results(results["sae"], path, recorded, control=results.get("control"))
    print(f"eval results: {written}")


def cmd_eval(a: argparse.Namespace) -> None:
    from saescope.control_sets import load_control
    from saescope.scope import Scope

    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k)
    control = load_control(a.control, scope.saes) if a.control else None
    path = (RunDir(a.out) if a.out else RunDir.of_sae(a.sae)).eval
    evaluate_and_print(scope.lm, scope.saes, path, control=control, data=a.data, text_column=a.text_column,
                       n_tokens=a.n_tokens, ctx_len=a.ctx_len, outlier_factor=a.outlier_factor)


def cmd_report(a: argparse.Namespace) -> None:
    from saescope.report import build_report

    print(f"report: {build_report(a.sae, a.out)}")


COMMANDS = {"eval": cmd_eval, "report": cmd_report}
