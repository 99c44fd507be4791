"""The performance side: who got what right, read from real result files.

Correctness matrix format (what `load_correctness` reads from a path): a CSV, one row per model, first
column `model`, then one column per item, values 0/1 (or any per-item score in [0, 1]); an empty cell is an
error, not a zero. Built-in sources:

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

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saescope.data.benchmarks import shared_data_dir
from saescope.errors import SaescopeError

# sloth_data_v1.csv headline columns for the benchmarks whose prompts saescope can footprint
SLOTH_HEADLINE = {"arc_challenge": "ARC", "hellaswag": "HellaSwag", "mmlu": "MMLU", "truthfulqa": "TruthfulQA",
                  "winogrande": "Winogrande", "gsm8k": "GSM8K", "ifeval": "IFEval", "bbh": "BBH", "math": "MATH Lvl 5"}
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


def load_correctness(spec: str) -> Correctness:
    """A correctness source: "m_ifeval:LANG", "sloth:BENCH" (subtask granularity) or a CSV path."""
    kind, _, arg = spec.partition(":")
    if kind == "m_ifeval" and arg:
        return _m_ifeval(arg)
    if kind == "sloth" and arg:
        return _sloth_subtasks(arg)
    path = Path(spec)
    if not path.is_file():
        raise SaescopeError(f"correctness source {spec!r}: not m_ifeval:LANG, sloth:BENCH or an existing CSV file")
    return _csv_matrix(path)


def _csv_matrix(path: Path) -> Correctness:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets save a byte-order mark
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 2 or not rows[0] or rows[0][0] != "model":
        raise SaescopeError(f"{path}: expected a header starting with 'model' and one row per model")
    items, models, values = rows[0][1:], [], []
    if len(set(items)) != len(items):
        raise SaescopeError(f"{path}: item names repeat in the header")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(items) + 1:
            raise SaescopeError(f"{path} line {i}: {len(row) - 1} values for {len(items)} items")
        try:
            vals = [float(v) for v in row[1:]]
        except ValueError as exc:
            raise SaescopeError(f"{path} line {i}: a value that is not a number ({exc})") from exc
        if any(math.isnan(v) or not 0 <= v <= 1 for v in vals):
            raise SaescopeError(f"{path} line {i}: values must be in [0, 1] (model {row[0]})")
        models.append(row[0])
        values.append(vals)
    if len(set(models)) != len(models):
        raise SaescopeError(f"{path}: a model appears twice")
    return Correctness(path.stem, models, items, np.array(values))


def _m_ifeval(lang: str) -> Correctness:
    folder = shared_data_dir() / "multilingual" / "m_ifeval" / "responses"
    files = sorted(folder.glob(f"{lang}__*.jsonl"))
    if not files:
        raise SaescopeError(f"no m_ifeval responses for language {lang!r} in {folder}")
    items: list[str] | None = None
    models, values = [], []
    for file in files:
        per_prompt = {}
        for i, line in enumerate(file.read_text().splitlines(), start=1):
            try:
                row = json.loads(line)
                per_prompt[row["prompt"]] = float(bool(row["follow_all_instructions"]))
            except (json.JSONDecodeError, KeyError) as exc:
                raise SaescopeError(f"{file} line {i}: not a response record ({exc})") from exc
        if items is None:
            items = sorted(per_prompt)
        elif set(per_prompt) != set(items):
            raise SaescopeError(f"{file.name}: its prompts differ from {files[0].name}'s "
                                f"({len(set(per_prompt) ^ set(items))} not in both); items must match across models")
        models.append(file.stem.split("__", 1)[1])
        values.append([per_prompt[p] for p in items])
    return Correctness(f"m_ifeval_{lang}", models, items or [], np.array(values))


def read_sloth(path: Path | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """Models and every numeric column of sloth_data_v1.csv (NaN where the leaderboard has no value)."""
    path = path or shared_data_dir() / "scores" / "sloth_data_v1.csv"
    if not path.is_file():
        raise SaescopeError(f"scores file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    models = [r["Model"] for r in rows]
    cols = {}
    for c in rows[0]:
        try:
            cols[c] = np.array([float(r[c]) if r[c] not in ("", None) else np.nan for r in rows])
        except ValueError:
            continue  # a text column (family, dates)
    return models, cols


def _sloth_subtasks(bench: str) -> Correctness:
    if bench not in _SLOTH_SUBTASKS:
        raise SaescopeError(f"sloth:{bench}: subtask scores exist for {', '.join(_SLOTH_SUBTASKS)}")
    models, cols = read_sloth()
    names = [c for c in cols if c.startswith(_SLOTH_SUBTASKS[bench])]
    m = np.column_stack([cols[c] for c in names])
    keep = ~np.isnan(m).any(1)
    notes = [f"{int((~keep).sum())} of {len(models)} models dropped: no score on some {bench} subtask"]
    if bench == "math":
        notes.append("the leaderboard's MATH subtasks are Level 5 problems only; the math prompt set is all of MATH")
    return Correctness(bench, [x for x, k in zip(models, keep) if k], names, m[keep], granularity="subtask", notes=notes)
