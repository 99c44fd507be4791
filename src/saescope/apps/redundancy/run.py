"""Benchmark redundancy as commands: `footprint` (each prompt's active features per layer, beside the control),
`report` (R_hat, coverage curves, overlaps, containment statements) and `compare` (against performance-based R and
score correlations across real models), each a config and a run_* returning a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saescope.api.controls import ControlOption
from saescope.api.scope import SAEOptions
from saescope.apps.redundancy.analysis import analyse, compare, load_result, perf_redundancy
from saescope.apps.redundancy.footprint import Footprints, compute_footprints
from saescope.apps.redundancy.performance import bench_scores, load_correctness
from saescope.apps.redundancy.render import format_compare, format_report, write_compare, write_report
from saescope.core.data.benchmarks import BENCHMARKS, SharedDataOption, load_benchmarks
from saescope.core.errors import ParamError
from saescope.core.io import RunDir
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.schema import REQUIRED, Config, config_field, escape

POOLS = ("last", "max", "all")
DEFAULT_PERF = ("m_ifeval:en", "m_ifeval:es", "m_ifeval:fr", "m_ifeval:ja", "sloth:mmlu", "sloth:bbh", "sloth:math")


@dataclass(kw_only=True)
class FootprintConfig(SAEOptions, LayersOption, ControlOption, SharedDataOption):
    """`saescope redundancy footprint`: encode benchmark prompts and store each prompt's active features per layer."""

    bench: str = config_field(REQUIRED, "comma-separated registry names or files (saescope redundancy list)")
    limit: int | None = config_field(None, "at most this many prompts per benchmark (a seeded random subset)", min=1)
    seed: int = config_field(0, "the seed of the subsets", min=0)
    pool: str = config_field("last", "the feature set of a prompt: its last token's, or of any token", choices=POOLS)
    column: str | None = config_field(None, "for files: the prompt column")
    template: str | None = config_field(None, "for files: a prompt template such as 'Question: {question}\\nAnswer:'")
    out: str | None = config_field(None, "footprint folder (default: SAE/redundancy)", output="folder")
    batch_size: int = config_field(16, "prompts per batch", min=1)
    # position 0 is left out of the pooling (the attention sink), so a prompt must keep at least 2 tokens
    max_length: int = config_field(512, "tokens per prompt (longer ones are cut)", min=2)

    def writes_into(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).redundancy


@dataclass
class FootprintResult:
    path: Path
    n_benchmarks: int
    n_prompts: int
    n_layers: int
    control: bool
    kept: list[str]

    def text(self) -> str:
        kept = f" ({', '.join(self.kept)} already there: kept)" if self.kept else ""
        return (f"footprinted {self.n_benchmarks} benchmarks ({self.n_prompts} prompts) on {self.n_layers} layers"
                f"{' with the control' if self.control else ''}{kept}\nfootprints: {self.path}")


@holding_lock
def run_footprint(cfg: FootprintConfig) -> FootprintResult:
    benches = load_benchmarks(cfg.bench, limit=cfg.limit, seed=cfg.seed, column=cfg.column, template=cfg.template,
                              shared_data=cfg.shared_data)
    scope = cfg.load_scope(cfg.layer_list())
    control = cfg.load_control(scope.saes)
    out = cfg.writes_into()
    # absolute paths: the folder can be extended or reported on from another working directory
    sae_name = str(Path(cfg.sae).resolve()) if Path(cfg.sae).exists() else cfg.sae
    control_name = str(Path(cfg.control).resolve()) if cfg.control else None
    kept = compute_footprints(scope, benches, out, sae_name=sae_name, pool=cfg.pool, control=control, control_name=control_name,
                              batch_size=cfg.batch_size, max_length=cfg.max_length)
    return FootprintResult(out, len(benches), sum(len(b.prompts) for b in benches), len(scope.layers), control is not None, kept)


@dataclass(kw_only=True)
class AnalysisConfig(Config):
    """`saescope redundancy report`: R_hat, coverage curves, overlap matrices and containment statements."""

    fp: str = config_field(REQUIRED, "the footprint folder", positional=True)
    layer: int | None = config_field(None, "the layer for statements and size-matched overlaps (default: middle)", min=0)
    repeats: int = config_field(100, "random orders for the coverage curves", min=1)
    matched_repeats: int = config_field(20, "random draws for the size-matched overlaps", min=1)
    subsume: float = config_field(0.6, "size-matched overlap above which A counts as inside B", min=0, max=1)

    def writes_into(self) -> Path:
        return Path(self.fp)


@dataclass
class AnalysisResult:
    path: Path
    result: dict

    def text(self) -> str:
        return (f"{format_report(self.result)}\nredundancy report: {self.path / 'redundancy.json'}, PNGs and "
                f"report-section.html in {self.path}")


@holding_lock
def run_analysis(cfg: AnalysisConfig) -> AnalysisResult:
    fp = Footprints.load(cfg.fp)
    res = analyse(fp, layer=cfg.layer, repeats=cfg.repeats, matched_repeats=cfg.matched_repeats, subsume=cfg.subsume)
    write_report(res, fp.path)
    return AnalysisResult(fp.path, res)


@dataclass(kw_only=True)
class CompareConfig(SharedDataOption):
    """`saescope redundancy compare`: R_hat against performance-based R, overlaps against score correlations."""

    fp: str = config_field(REQUIRED, "the footprint folder", positional=True)
    perf: list[str] = config_field(list(DEFAULT_PERF), "correctness sources: m_ifeval:LANG, sloth:BENCH or CSV files")
    scores: str | None = config_field(None, "a per-model score table (CSV): a 'model' column and one column per benchmark, "
                                      "named as the footprinted prompt set (default: shared/data/scores/sloth_data_v1.csv)")
    score_columns: list[str] | None = config_field(None, "which column scores which benchmark, when the names differ: "
                                                   "'MATH=math,GSM8K=gsm8k' (only these columns are then used)")
    repeats: int = config_field(50, "random subsets per size for the performance curves", min=1)
    n_perm: int = config_field(10_000, "permutations for the p-values", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.column_map()

    def column_map(self) -> dict[str, str] | None:
        """score_columns as {column: benchmark}."""
        if not self.score_columns:
            return None
        pairs = [p.partition("=") for p in self.score_columns if p.strip()]
        if not pairs or any(not col.strip() or not eq or not b.strip() for col, eq, b in pairs):
            raise ParamError(f"{{}}: expected COLUMN=BENCHMARK[,COLUMN=BENCHMARK...], got {escape(','.join(self.score_columns))!r}",
                             "score_columns")
        return {col.strip(): b.strip() for col, _, b in pairs}

    def writes_into(self) -> Path:
        return Path(self.fp)


@dataclass
class CompareResult:
    path: Path
    comparison: dict
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([*self.notes, format_compare(self.comparison), f"comparison: {self.path}"])


@holding_lock
def run_compare(cfg: CompareConfig) -> CompareResult:
    # every input is read and checked before the slow part and before compare.json is written
    res = load_result(Path(cfg.fp) / "redundancy.json")
    scores = bench_scores(res["benchmarks"], Path(cfg.scores) if cfg.scores else None, cfg.column_map(),
                          shared_data=cfg.shared_data)
    sources = {spec: load_correctness(spec, cfg.shared_data) for spec in cfg.perf if spec}
    notes = [f"{spec}: {note}" for spec, c in sources.items() for note in c.notes]
    perf = [perf_redundancy(c, repeats=cfg.repeats) for c in sources.values()]
    cmp = compare(res, perf, scores=scores, n_perm=cfg.n_perm)
    cmp["perf"] = perf
    write_compare(cmp, Path(cfg.fp))
    return CompareResult(Path(cfg.fp) / "compare.json", cmp, notes)


@dataclass(kw_only=True)
class ListConfig(Config):
    """`saescope redundancy list`: the built-in benchmark prompt sets."""


@dataclass
class ListResult:
    def text(self) -> str:
        return "\n".join(f"{name:<20} {spec.description}" for name, spec in BENCHMARKS.items())


def run_list(cfg: ListConfig) -> ListResult:
    return ListResult()
