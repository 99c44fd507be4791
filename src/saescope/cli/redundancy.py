"""`saescope redundancy footprint | report | compare`: thin wrappers over the redundancy API."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import add_model_dtype_flag, add_shared_data_flag, layer_list, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir
from saescope.core.schema import check_number

DEFAULT_PERF = "m_ifeval:en,m_ifeval:es,m_ifeval:fr,m_ifeval:ja,sloth:mmlu,sloth:bbh,sloth:math"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("redundancy", help="benchmark redundancy from SAE feature footprints (R_hat, overlaps)")
    rsub = p.add_subparsers(dest="redundancy_command", required=True)
    f = rsub.add_parser("footprint", help="encode benchmark prompts and store each prompt's active features per layer")
    f.add_argument("--sae", required=True)
    add_model_dtype_flag(f)
    f.add_argument("--model", help="default: the SAEs' model")
    f.add_argument("--bench", required=True, help="comma-separated registry names or files (saescope redundancy list)")
    f.add_argument("--limit", type=int, help="at most this many prompts per benchmark (a seeded random subset)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--pool", default="last", choices=["last", "max", "all"])
    f.add_argument("--column", help="for files: the prompt column")
    f.add_argument("--template", help="for files: a prompt template such as 'Question: {question}\\nAnswer:'")
    f.add_argument("--layers")
    f.add_argument("--k", type=int)
    f.add_argument("--control", help="a random control (saescope control random): footprinted in the same pass")
    writes(f, "--out", folder=True, help="footprint folder (default: SAE/redundancy)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--max-length", type=int, default=512)
    add_shared_data_flag(f)
    r = rsub.add_parser("report", help="R_hat, coverage curves, overlap matrices, containment statements")
    r.add_argument("fp", help="the footprint folder")
    r.add_argument("--layer", type=int, help="the layer for statements and size-matched overlaps (default: middle)")
    r.add_argument("--repeats", type=int, default=100, help="random orders for the coverage curves")
    r.add_argument("--matched-repeats", type=int, default=20)
    r.add_argument("--subsume", type=float, default=0.6, help="size-matched overlap above which A counts as inside B")
    c = rsub.add_parser("compare", help="R_hat against performance-based R, overlaps against score correlations")
    c.add_argument("fp")
    c.add_argument("--perf", default=DEFAULT_PERF, help="correctness sources: m_ifeval:LANG, sloth:BENCH or CSV files")
    c.add_argument("--scores", help="a per-model score table (CSV): a 'model' column and one column per benchmark, named "
                   "as the footprinted prompt set (default: shared/data/scores/sloth_data_v1.csv)")
    c.add_argument("--score-columns", help="which column scores which benchmark, when the names differ: "
                   "'MATH=math,GSM8K=gsm8k' (only these columns are then used)")
    c.add_argument("--repeats", type=int, default=50)
    c.add_argument("--n-perm", type=int, default=10_000)
    add_shared_data_flag(c)
    rsub.add_parser("list", help="the built-in benchmark prompt sets")


def cmd_redundancy(a: argparse.Namespace) -> None:
    {"footprint": _footprint, "report": _report, "compare": _compare, "list": _list}[a.redundancy_command](a)


def _list(_a: argparse.Namespace) -> None:
    from saescope.core.data.benchmarks import BENCHMARKS

    for name, spec in BENCHMARKS.items():
        print(f"{name:<20} {spec.description}")


def _footprint(a: argparse.Namespace) -> None:
    from saescope.api.controls import load_control
    from saescope.core.data.benchmarks import load_benchmarks
    from saescope.apps.redundancy.footprint import compute_footprints
    from saescope.api.scope import Scope

    # The ranges of numeric flags are checked for every command in saescope.cli (FLAG_RANGES); footprints need one
    # more: position 0 is left out of the pooling (the attention sink), so a prompt must keep at least 2 tokens.
    check_number(a.max_length, "--max-length", kind=int, min=2)
    benches = load_benchmarks(a.bench, limit=a.limit, seed=a.seed, column=a.column, template=a.template)
    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k, dtype=a.model_dtype)
    control = load_control(a.control, scope.saes) if a.control else None
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).redundancy
    print(f"footprinting {len(benches)} benchmarks ({sum(len(b.prompts) for b in benches)} prompts) on "
          f"{len(scope.layers)} layers{' with the random control' if control else ''} -> {out}")
    # absolute paths: the folder can be extended or reported on from another working directory
    sae_name = str(Path(a.sae).resolve()) if Path(a.sae).exists() else a.sae
    control_name = str(Path(a.control).resolve()) if a.control else None
    compute_footprints(scope, benches, out, sae_name=sae_name, pool=a.pool, control=control, control_name=control_name,
                       batch_size=a.batch_size, max_length=a.max_length)
    print(f"footprints: {out}")


def _report(a: argparse.Namespace) -> None:
    from saescope.apps.redundancy.analysis import analyse
    from saescope.apps.redundancy.footprint import Footprints
    from saescope.apps.redundancy.render import format_report, write_report

    fp = Footprints.load(a.fp)
    res = analyse(fp, layer=a.layer, repeats=a.repeats, matched_repeats=a.matched_repeats, subsume=a.subsume)
    write_report(res, fp.path)
    print(format_report(res))
    print(f"redundancy report: {fp.path / 'redundancy.json'}, PNGs and report-section.html in {fp.path}")


def _score_columns(spec: str | None) -> dict[str, str] | None:
    """'COLUMN=BENCHMARK,...' as {column: benchmark}."""
    if not spec:
        return None
    pairs = [p.partition("=") for p in spec.split(",") if p.strip()]
    if not pairs or any(not col.strip() or not eq or not b.strip() for col, eq, b in pairs):
        raise SaescopeError(f"--score-columns: expected COLUMN=BENCHMARK[,COLUMN=BENCHMARK...], got {spec!r}")
    return {col.strip(): b.strip() for col, _, b in pairs}


def _compare(a: argparse.Namespace) -> None:
    from saescope.apps.redundancy.analysis import compare, load_result, perf_redundancy
    from saescope.apps.redundancy.performance import bench_scores, load_correctness
    from saescope.apps.redundancy.render import format_compare, write_compare

    # every input is read and checked before the slow part and before compare.json is written
    res = load_result(Path(a.fp) / "redundancy.json")
    scores = bench_scores(res["benchmarks"], Path(a.scores) if a.scores else None, _score_columns(a.score_columns))
    sources = {spec: load_correctness(spec) for spec in a.perf.split(",") if spec}
    perf = []
    for spec, c in sources.items():
        for note in c.notes:
            print(f"{spec}: {note}")
        perf.append(perf_redundancy(c, repeats=a.repeats))
    cmp = compare(res, perf, scores=scores, n_perm=a.n_perm)
    cmp["perf"] = perf
    write_compare(cmp, Path(a.fp))
    print(format_compare(cmp))
    print(f"comparison: {Path(a.fp) / 'compare.json'}")


COMMANDS = {"redundancy": cmd_redundancy}
