"""`saescope eval | report`: per-layer figures of a set of SAEs (beside a random control), and a run's HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import add_sae_flags, add_shared_data_flag, layer_list, writes
from saescope.core.io import RunDir


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

    p = sub.add_parser("quality", help="SAE quality beside the control: sparse probing on real labelled text (SAEBench), "
                       "FVU on maths, code and non-English text, decoder movement")
    add_sae_flags(p)
    p.add_argument("--control", help="a random control (saescope control random): its figures beside the SAEs'")
    p.add_argument("--tasks", help="comma-separated probe tasks (default: all; see saescope.api.probing.TASKS)")
    p.add_argument("--per-class", type=int, default=100, help="texts per class and task (a seeded sample)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per probed text")
    p.add_argument("--fvu-tokens", type=int, default=4096, help="tokens per domain for FVU")
    p.add_argument("--absorption-words", type=int, default=1200,
                   help="words for the first-letter feature-absorption measurement (0 = skip it)")
    add_shared_data_flag(p)
    p.add_argument("--seed", type=int, default=0)
    writes(p, "--out", folder=False, help="JSON results (default: SAE/quality.json)")

    p = sub.add_parser("report", help="a self-contained HTML page: training, evaluation, trust checks")
    p.add_argument("--sae", required=True, help="the run folder")
    writes(p, "--out", folder=False, help="HTML file (default: SAE/report.html)")


def evaluate_and_print(lm, saes: dict, path: Path, control: dict | None = None, **settings) -> None:
    """Evaluate `saes` (and `control`) with `settings` (saescope.api.evaluate.evaluate_sets), print the table and merge
    the figures into the eval file at PATH."""
    from saescope.api.evaluate import evaluate_sets, format_comparison, format_table, read_results, write_results
    from saescope.core.models.load import DTYPE_NAMES

    read_results(path)  # a file the results could not merge into is refused before the work
    sets = {"sae": saes} if control is None else {"sae": saes, "control": control}
    results = evaluate_sets(lm, sets, **settings)
    print(format_table(results["sae"]) if control is None else format_comparison(results["sae"], results["control"]))
    recorded = {"model": lm.name, **{k: v for k, v in settings.items() if k != "data"}, "data": settings.get("data") or "default",
                "model_dtype": DTYPE_NAMES.get(lm.dtype, str(lm.dtype))}
    written = write_results(results["sae"], path, recorded, control=results.get("control"))
    print(f"eval results: {written}")


def cmd_eval(a: argparse.Namespace) -> None:
    from saescope.api.controls import load_control
    from saescope.api.scope import Scope

    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k, dtype=a.model_dtype)
    control = load_control(a.control, scope.saes) if a.control else None
    path = (RunDir(a.out) if a.out else RunDir.of_sae(a.sae)).eval
    evaluate_and_print(scope.lm, scope.saes, path, control=control, data=a.data, text_column=a.text_column,
                       n_tokens=a.n_tokens, ctx_len=a.ctx_len, outlier_factor=a.outlier_factor)


def cmd_quality(a: argparse.Namespace) -> None:
    from saescope.api.absorption import AbsorptionConfig, format_absorption
    from saescope.api.controls import load_control
    from saescope.core.files import atomic_write_json
    from saescope.core.models.load import DTYPE_NAMES
    from saescope.api.probing import format_probing, probe_sets
    from saescope.api.quality import format_quality, quality_report
    from saescope.api.scope import Scope

    probes = probe_sets(a.tasks.split(",") if a.tasks else None, per_class=a.per_class, seed=a.seed)  # data first: fail fast
    absorption = AbsorptionConfig(n_words=a.absorption_words, seed=a.seed) if a.absorption_words else None
    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k, dtype=a.model_dtype)
    control = load_control(a.control, scope.saes) if a.control else None
    report = quality_report(scope, probes, control=control, run=a.sae, fvu_tokens=a.fvu_tokens, max_length=a.max_length,
                            absorption=absorption)
    report.update(sae=a.sae, control_path=a.control, per_class=a.per_class, seed=a.seed,
                  model_dtype=DTYPE_NAMES[scope.lm.dtype])
    print(format_probing(report["probing"]))
    if report["absorption"]:
        print(format_absorption(report["absorption"]))
    print(format_quality(report))
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).quality
    atomic_write_json(out, report)
    print(f"quality results: {out}")


def cmd_report(a: argparse.Namespace) -> None:
    from saescope.apps.report.page import build_report

    print(f"report: {build_report(a.sae, a.out)}")


COMMANDS = {"eval": cmd_eval, "quality": cmd_quality, "report": cmd_report}
