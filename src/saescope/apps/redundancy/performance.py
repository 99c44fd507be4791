"""The performance side: who got what right, read from real result files.

Correctness matrix format (what `load_correctness` reads from a path): a CSV, one row per model, a column
`model` (any case, usually first), then one column per item, values 0/1 (or any per-item score in [0, 1]); an
empty cell is an error, not a zero. Score table format (`bench_scores`, `saescope redundancy compare --scores`):
a CSV with a `model` column and one column per benchmark named as its prompt set (or its leaderboard headline,
or mapped explicitly); other columns are ignored, an empty cell is a model without that score. Built-in sources:

    m_ifeval:{en,es,fr,ja}   17 models' real responses to multilingual IFEval (shared/data/multilingual/
                             m_ifeval/responses), item = prompt, correct = every instruction followed (strict)
    sloth:{mmlu,bbh,math,musr}   197 leaderboard models (shared/data/scores/sloth_data_v1.csv), "items" = the
                             benchmark's subtasks (MMLU's 57 subjects, BBH's 24 tasks, MATH Level 5's 7 areas, MuSR's
                             3): per-subtask accuracies, a coarser granularity than items, labelled as such in every
                             output. GPQA's columns are nested sets of one pool (diamond < main < extended), not
                             subtasks, so it is not offered. The leaderboard's MATH is Level 5 only, while the
                             `math` prompt set is all of MATH: each output that pairs them says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saescope.core.data.benchmarks import shared_data_dir
from saescope.core.data.rows import iter_rows, row_format
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import Field, check_record, escape

# sloth_data_v1.csv headline columns for the benchmarks whose prompts saescope can footprint
SLOTH_HEADLINE = {"arc_challenge": "ARC", "hellaswag": "HellaSwag", "mmlu": "MMLU", "truthfulqa": "TruthfulQA",
                  "winogrande": "Winogrande", "gsm8k": "GSM8K", "ifeval": "IFEval", "bbh": "BBH", "math": "MATH Lvl 5"}
MAX_SCORE = 1e6  # a benchmark score beyond this in magnitude is a mistake (and overflows correlations), not a score
_SLOTH_SUBTASKS = {"mmlu": "hendrycksTest-", "bbh": "bbh_", "math": "math_", "musr": "musr_"}


@dataclass
class Correctness:
    benchmark: str
    models: list[str]
    items: list[str]
    matrix: np.ndarray  # (models, items) in [0, 1]
    granularity: str = "item"  # or "subtask"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.matrix.shape != (len(self.models), len(self.items)):
            raise SaescopeError(f"{self.benchmark}: correctness matrix is {self.matrix.shape}, but there are "
                                f"{len(self.models)} models and {len(self.items)} items")
        if len(self.models) < 3:
            raise SaescopeError(f"{self.benchmark}: {len(self.models)} models; R(D) ranks models and needs at least 3")


def load_correctness(spec: str, shared_data: str | Path | None = None) -> Correctness:
    """A correctness source: "m_ifeval:LANG", "sloth:BENCH" (subtask granularity), both read from the shared reference
    data (`shared_data`, default $SAESCOPE_SHARED_DATA), or a CSV path."""
    kind, _, arg = spec.partition(":")
    if kind == "m_ifeval" and arg:
        return _m_ifeval(arg, shared_data)
    if kind == "sloth" and arg:
        return _sloth_subtasks(arg, shared_data)
    path = Path(spec)
    if not path.is_file():
        raise SaescopeError(f"correctness source {spec!r}: not m_ifeval:LANG, sloth:BENCH or an existing CSV file")
    return _csv_matrix(path)


def _read_csv(path: Path) -> list[tuple[str, list[str]]]:
    """(where, cells) of each non-blank row of a CSV file, the header first (saescope.core.data.rows)."""
    if row_format(path.name) != "csv":
        raise SaescopeError(f"{path}: expected a .csv file")
    return list(iter_rows(path, raw=True))


def _model_column(header: list[str], path: Path, what: str) -> int:
    names = [h.strip().lower() for h in header]
    if names.count("model") != 1:
        found = ", ".join(repr(h) for h in header[:12]) + (", ..." if len(header) > 12 else "")
        raise SaescopeError(f"{path}: expected {what} with one column named 'model' (columns found: {found or 'none'})")
    return names.index("model")


def _csv_matrix(path: Path) -> Correctness:
    rows = _read_csv(path)
    if not rows:
        raise SaescopeError(f"{path}: empty file; expected a header 'model,ITEM,...' and one row per model")
    header = rows[0][1]
    mcol = _model_column(header, path, "a correctness matrix")
    items = [h for j, h in enumerate(header) if j != mcol]
    if len(set(items)) != len(items) or not all(h.strip() for h in items):
        raise SaescopeError(f"{path}: item names in the header must be non-empty and distinct (item names repeat?)")
    if len(items) < 2:
        raise SaescopeError(f"{path}: {len(items)} item columns; R(D) needs at least 2 items")
    models, values = [], []
    for i, row in rows[1:]:
        if len(row) != len(header):
            raise SaescopeError(f"{path} {i}: {len(row) - 1} values for {len(items)} items")
        vals = []
        for item, cell in zip(items, (c for j, c in enumerate(row) if j != mcol)):
            try:
                v = float(cell)
            except ValueError:
                raise SaescopeError(f"{path} {i}, item {item!r}: {cell!r} is not a number "
                                    "(an empty cell is an error, not a zero)") from None
            if math.isnan(v) or not 0 <= v <= 1:
                raise SaescopeError(f"{path} {i}, item {item!r}: values must be in [0, 1] (model {row[mcol]}), got {cell!r}")
            vals.append(v)
        models.append(row[mcol])
        values.append(vals)
    if len(set(models)) != len(models):
        raise SaescopeError(f"{path}: a model appears twice")
    if len(models) < 3:
        raise SaescopeError(f"{path}: {len(models)} models; R(D) ranks models and needs at least 3")
    return Correctness(path.stem, models, items, np.array(values))


def _m_ifeval(lang: str, shared_data: str | Path | None) -> Correctness:
    folder = shared_data_dir(shared_data) / "multilingual" / "m_ifeval" / "responses"
    files = sorted(folder.glob(f"{lang}__*.jsonl"))
    if not files:
        raise SaescopeError(f"no m_ifeval responses for language {lang!r} in {folder}")
    items: list[str] | None = None
    models, values = [], []
    for file in files:
        per_prompt = {}
        for where, row in iter_rows(file):
            check_record(row, {"prompt": Field(str), "follow_all_instructions": Field((bool, int))}, f"{file} {where}")
            per_prompt[row["prompt"]] = float(bool(row["follow_all_instructions"]))
        if items is None:
            items = sorted(per_prompt)
        elif set(per_prompt) != set(items):
            raise SaescopeError(f"{file.name}: its prompts differ from {files[0].name}'s "
                                f"({len(set(per_prompt) ^ set(items))} not in both); items must match across models")
        models.append(file.stem.split("__", 1)[1])
        values.append([per_prompt[p] for p in items])
    return Correctness(f"m_ifeval_{lang}", models, items or [], np.array(values))


@dataclass
class ScoreTable:
    """A per-model score table (CSV): one `model` column and any others; cells become numbers only when used,
    so text columns (family, dates) are no error."""

    path: Path
    models: list[str]
    columns: list[str]  # every named column but the model column
    cells: dict[str, list[str]]
    lines: list[str]  # where each model's row is in the file ("line 12")

    def numbers(self, column: str) -> np.ndarray:
        """A column as floats, NaN where the cell is empty (a model without that score)."""
        out = np.full(len(self.models), np.nan)
        for r, cell in enumerate(self.cells[column]):
            if cell.strip().lower() in ("", "nan"):
                continue
            try:
                out[r] = float(cell)
            except ValueError:
                raise SaescopeError(f"{self.path} {self.lines[r]}, column {column!r}: {cell!r} is not a number") from None
            if not math.isfinite(out[r]):
                raise SaescopeError(f"{self.path} {self.lines[r]}, column {column!r}: {cell!r} is not a finite number")
            if abs(out[r]) > MAX_SCORE:
                raise SaescopeError(f"{self.path} {self.lines[r]}, column {column!r}: {cell!r} is not a score "
                                    f"(magnitude above {MAX_SCORE:g})")
        return out


def read_scores(path: Path | None = None, shared_data: str | Path | None = None) -> ScoreTable:
    """A score table; default: the leaderboard's sloth_data_v1.csv in the shared reference data."""
    path = path or shared_data_dir(shared_data) / "scores" / "sloth_data_v1.csv"
    if not path.is_file():
        raise SaescopeError(f"scores file not found: {path}")
    rows = _read_csv(path)
    if len(rows) < 2:
        raise SaescopeError(f"{path}: {'empty file' if not rows else 'no model rows'}; expected a header with a 'model' "
                            "column and one column per benchmark, then one row per model")
    header = rows[0][1]
    mcol = _model_column(header, path, "a score table")
    for i, row in rows[1:]:
        if len(row) != len(header):
            raise SaescopeError(f"{path} {i}: {len(row)} cells for {len(header)} columns")
    named = [(j, h) for j, h in enumerate(header) if j != mcol and h.strip()]
    if len({h for _, h in named}) != len(named):
        raise SaescopeError(f"{path}: a column name appears twice in the header")
    return ScoreTable(path, [r[mcol] for _, r in rows[1:]], [h for _, h in named],
                      {h: [r[j] for _, r in rows[1:]] for j, h in named}, [i for i, _ in rows[1:]])


@dataclass
class BenchScores:
    """The score columns of a table that belong to footprinted benchmarks."""

    path: Path
    columns: dict[str, str]  # benchmark -> column
    values: dict[str, np.ndarray]  # benchmark -> score per model, NaN where the model has none
    notes: list[str]


def _names(xs: list[str], at_most: int = 8) -> str:
    return ", ".join(xs[:at_most]) + (f" and {len(xs) - at_most} more" if len(xs) > at_most else "")


def bench_scores(benches: list[str], path: Path | None = None, mapping: dict[str, str] | None = None,
                 shared_data: str | Path | None = None) -> BenchScores:
    """Match the score columns to the benchmarks: `mapping` (column -> benchmark) when given, else a column named as
    the benchmark (any case) or as its leaderboard headline (SLOTH_HEADLINE: 'MATH Lvl 5' for math). A table the
    user named (`path`) that matches nothing is an error; the default table then only gets a note."""
    table = read_scores(path, shared_data)
    expected = _names([f"{b} (or {SLOTH_HEADLINE[b]!r})" if b in SLOTH_HEADLINE else b for b in benches], 12)
    if mapping:
        for col, b in mapping.items():
            if col not in table.columns:
                raise ParamError("{}: " + escape(f"{table.path} has no column {col!r} (columns: {_names(table.columns, 12)})"),
                                 "score_columns")
            if b not in benches:
                raise ParamError("{}: " + escape(f"{b!r} is not a footprinted benchmark (have {', '.join(benches)})"), "score_columns")
        if len(set(mapping.values())) != len(mapping):
            raise ParamError("{}: a benchmark is given two columns", "score_columns")
        columns = {b: col for col, b in mapping.items()}
    else:
        columns = {}
        for col in table.columns:
            for b in benches:
                if col.strip().lower() == b.lower() or col == SLOTH_HEADLINE.get(b):
                    if b in columns:
                        raise ParamError(escape(f"{table.path}: columns {columns[b]!r} and {col!r} both match benchmark {b}")
                                         + "; choose one with {} COLUMN=BENCHMARK", "score_columns")
                    columns[b] = col
    notes = []
    if not columns:
        if path is not None:
            raise ParamError(escape(f"{table.path}: no column matches a footprinted benchmark (columns: {_names(table.columns, 12)}; "
                                    f"expected: {expected})") + "; map them with {} COLUMN=BENCHMARK", "score_columns")
        notes.append(f"{table.path.name}: no score column for any footprinted benchmark (expected: {expected})")
    if path is not None:  # the user's table: one row per model, enough models to correlate
        seen: dict[str, str] = {}
        for m, line in zip(table.models, table.lines):
            if m.strip() in seen:
                raise SaescopeError(f"{table.path} {line}: model {m.strip()!r} appears twice "
                                    f"(first on {seen[m.strip()]}); give each model one row")
            seen[m.strip()] = line
        if len(table.models) < 3:
            raise SaescopeError(f"{table.path}: {len(table.models)} models; correlating scores across models needs at least 3")
    ignored = [c for c in table.columns if c not in columns.values()]
    if ignored and columns:
        notes.append(f"{table.path.name}: {len(ignored)} columns match no footprinted benchmark and are ignored ({_names(ignored)})")
    if columns and (without := [b for b in benches if b not in columns]):
        notes.append(f"no score column for: {_names(without, 12)}")
    if len(set(table.models)) != len(table.models):
        notes.append(f"{table.path.name}: {len(table.models) - len(set(table.models))} model names repeat; each row counts as a model")
    ordered = {b: columns[b] for b in benches if b in columns}  # footprint order
    return BenchScores(table.path, ordered, {b: table.numbers(c) for b, c in ordered.items()}, notes)


def _sloth_subtasks(bench: str, shared_data: str | Path | None) -> Correctness:
    if bench not in _SLOTH_SUBTASKS:
        raise SaescopeError(f"sloth:{bench}: subtask scores exist for {', '.join(_SLOTH_SUBTASKS)}")
    table = read_scores(shared_data=shared_data)
    names = [c for c in table.columns if c.startswith(_SLOTH_SUBTASKS[bench])]
    if not names:
        raise SaescopeError(f"{table.path}: no {_SLOTH_SUBTASKS[bench]}* subtask columns")
    m = np.column_stack([table.numbers(c) for c in names])
    models = table.models
    keep = ~np.isnan(m).any(1)
    notes = [f"{int((~keep).sum())} of {len(models)} models dropped: no score on some {bench} subtask"]
    if bench == "math":
        notes.append("the leaderboard's MATH subtasks are Level 5 problems only; the math prompt set is all of MATH")
    return Correctness(bench, [x for x, k in zip(models, keep) if k], names, m[keep], granularity="subtask", notes=notes)
