"""Text sources: local files and folders, Hugging Face datasets, and the embedded default corpus.

The embedded corpora (`default`, a mix of prose, code, translations and maths; `passages`, the prose alone) are
real text from pinned PyPI wheels: see saescope.core.data.corpus for the sources, licences and shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from saescope.core.data.corpus import CORPORA
from saescope.core.data.rows import SUFFIXES, Row, iter_rows, row_format
from saescope.core.errors import SaescopeError
from saescope.core.hub import hub_reachable
from saescope.core.schema import Field, InputError, check_record

DEFAULT_CORPUS = "default"


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


def default_corpus_path(name: str = DEFAULT_CORPUS) -> Path:
    """The cached file of an embedded corpus (built from its wheels on first use)."""
    return CORPORA[name]()


def texts_of(rows: Iterable[Row], column: str, origin: str) -> Iterator[str]:
    """The text of each row: a paragraph (a string) as it is, else the `column` field of an object, which must be
    text (or empty: skipped)."""
    for where, row in rows:
        if isinstance(row, str):
            if row:
                yield row
            continue
        if isinstance(row, dict) and column not in row:
            raise InputError(f"{origin} {where}: no column {column!r} (it has {', '.join(map(str, row)) or 'nothing'})")
        value = check_record(row, {column: Field(str, nullable=True)}, f"{origin} {where}")[column]
        if value:
            yield value


def _read_file(path: Path, column: str) -> Iterator[str]:
    yield from texts_of(iter_rows(path, require=column), column, str(path))


def iter_texts(spec: str | None = None, *, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Texts of DATA in a fixed order. split='train'|'eval'|'all' applies the held-out document split."""
    spec = spec or DEFAULT_CORPUS
    if spec in CORPORA:
        path = default_corpus_path(spec)
    else:
        path = Path(spec).expanduser()
    on_disk = is_path(str(path))
    if on_disk and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and row_format(p.name))
        if not files:
            raise SaescopeError(f"{path}: folder holds no text files ({', '.join(SUFFIXES)}, optionally .gz)")
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
    yield from texts_of(((f"row {i}", row) for i, row in enumerate(hub_rows(repo_id, "train"), 1)), column, repo_id)


def hub_rows(repo_id: str, split: str) -> Iterator[dict]:
    """Rows of a Hugging Face dataset split, streamed (needs `datasets` and a reachable hub)."""
    try:
        import datasets
    except ImportError as exc:
        raise SaescopeError(f"{repo_id} looks like a Hugging Face dataset id; `pip install datasets` to stream it") from exc
    if not hub_reachable():  # streaming needs the hub; asking it anyway would retry for most of a minute
        raise SaescopeError(f"cannot open Hugging Face dataset {repo_id!r}: the hub cannot be reached from here")
    try:
        ds = datasets.load_dataset(repo_id, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; all mean the same to the user
        raise SaescopeError(f"cannot open Hugging Face dataset {repo_id!r} (is the hub reachable?): {exc}") from exc
    yield from iter(ds)
