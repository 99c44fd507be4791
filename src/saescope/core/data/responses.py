"""Prompt/response pairs for fine-tuning, and the prompts and real answers a behaviour is found and measured on.

    responses:LANG:MODEL   real answers from ../shared/data (M-IFEval: 541 English prompts, 17 models' responses),
                           e.g. responses:en:gpt-4o-2024-08-06; `:train` (default for fine-tuning) or `:test` picks
                           the side of a seeded 80/20 split by prompt, so training and measurement never share a
                           prompt
    a file                 csv/jsonl/json/parquet with a prompt and a response column (names configurable)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.core.data.labelled import in_test_split
from saescope.core.data.rows import iter_rows
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import escape

TEST_SHARE = 0.2


@dataclass
class Pair:
    prompt: str
    response: str
    key: str


def split_of(key: str) -> str:
    return "test" if in_test_split(key, 0, TEST_SHARE) else "train"


def _builtin(spec: str, shared_data: str | None) -> tuple[Path, str | None]:
    from saescope.core.data.benchmarks import shared_data_dir

    parts = spec.split(":")
    split = parts.pop() if parts[-1] in ("train", "test", "all") else "train"
    if len(parts) != 3:
        raise SaescopeError(f"{spec!r}: write responses:LANG:MODEL[:train|test|all], e.g. responses:en:gpt-4o-2024-08-06")
    _, lang, model = parts
    folder = shared_data_dir(shared_data) / "multilingual" / "m_ifeval" / "responses"
    path = folder / f"{lang}__{model.replace('/', '__')}.jsonl"
    if not path.exists():
        have = sorted({p.name.split("__", 1)[1].removesuffix(".jsonl") for p in folder.glob(f"{lang}__*.jsonl")})
        raise SaescopeError(f"no responses of {model!r} in {lang!r}" + (f" (have: {', '.join(have)})" if have else
                                                                         f" (no language {lang!r} in {folder})"))
    return path, None if split == "all" else split


def load_pairs(spec: str, *, prompt_column: str = "prompt", response_column: str = "response", split: str | None = None,
               limit: int | None = None, shared_data: str | None = None) -> list[Pair]:
    """The (prompt, response) pairs of SPEC; empty responses are skipped (a model that answered nothing teaches nothing)."""
    if spec.startswith("responses:"):
        path, default_split = _builtin(spec, shared_data)
        split = split or default_split
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ParamError(f"{{}} {escape(spec)}: no such file (give a csv/jsonl/parquet with {escape(prompt_column)} and "
                             f"{escape(response_column)} columns, or responses:LANG:MODEL)", "data")
    pairs: list[Pair] = []
    for where, row in iter_rows(path, require=prompt_column):
        if not isinstance(row, dict):
            raise SaescopeError(f"{where}: a row must be an object with {prompt_column!r} and {response_column!r}")
        missing = [c for c in (prompt_column, response_column) if c not in row]
        if missing:
            raise ParamError(escape(f"{where}: no column {missing[0]!r} (columns: {', '.join(map(str, row))})")
                             + "; name them with {} / {}", "prompt_column", "response_column")
        prompt, response = row[prompt_column], row[response_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise SaescopeError(f"{where}: the prompt is empty or not text")
        if response is None or (isinstance(response, str) and not response.strip()):
            continue
        if not isinstance(response, str):
            raise SaescopeError(f"{where}: the response is not text ({type(response).__name__})")
        key = prompt  # the responses files carry no key; the prompt itself names the pair on both sides of the split
        if split and split_of(key) != split:
            continue
        pairs.append(Pair(prompt, response, key))
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise SaescopeError(f"{spec}: no prompt/response pairs" + (f" on the {split} side" if split else ""))
    return pairs


def heldout_prompts(lang: str = "en", *, limit: int | None = None, shared_data: str | None = None) -> list[str]:
    """M-IFEval prompts of the test side of the split (the prompts no `responses:...` training set holds)."""
    from saescope.core.data.benchmarks import shared_data_dir

    path = shared_data_dir(shared_data) / "multilingual" / "m_ifeval" / f"{lang}_input_data.jsonl"
    out = [row["prompt"] for _, row in iter_rows(path) if isinstance(row, dict) and split_of(row["prompt"]) == "test"]
    return out[:limit] if limit else out


def responses(lang: str = "en", *, split: str = "train", shared_data: str | None = None) -> list[str]:
    """Every M-IFEval response (all 17 models) in `lang` whose prompt is on the `split` side of the prompt split."""
    from saescope.core.data.benchmarks import shared_data_dir

    folder = shared_data_dir(shared_data) / "multilingual" / "m_ifeval" / "responses"
    out = []
    for path in sorted(folder.glob(f"{lang}__*.jsonl")):
        for _, row in iter_rows(path):
            if isinstance(row, dict) and isinstance(row.get("response"), str) and split_of(row["prompt"]) == split:
                out.append(row["response"])
    if not out:
        raise SaescopeError(f"no responses in {lang!r} under {folder}")
    return out


def train_prompts(lang: str = "en", *, limit: int | None = None, shared_data: str | None = None) -> list[str]:
    """M-IFEval prompts on the train side of the split (for discovery and its steering check)."""
    from saescope.core.data.benchmarks import shared_data_dir

    path = shared_data_dir(shared_data) / "multilingual" / "m_ifeval" / f"{lang}_input_data.jsonl"
    out = [row["prompt"] for _, row in iter_rows(path) if isinstance(row, dict) and split_of(row["prompt"]) == "train"]
    return out[:limit] if limit else out
