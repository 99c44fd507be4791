"""The one row reader: every text input saescope takes (training corpora, benchmark prompt sets, `inspect --texts`,
labelled sets) is read here, streamed, so that a corpus is never held whole and every reader agrees on a file.

    jsonl           one JSON value per line (blank lines skipped)
    json            a list of rows, or an object holding one list (with several, the one under "examples" or "data")
    csv, tsv        a header line, then one row per line; TSV fields are verbatim (no quoting: MGSM's questions carry
                    stray '"'); blank lines skipped; a header-less table is read with `columns=`
    txt, md         one row (a string) per blank-line separated paragraph
    parquet, arrow  one row per record, a record batch at a time (arrow: the IPC stream format of `datasets`)

Each may be gzipped (`.jsonl.gz`, `.csv.gz`, ...; not parquet, which compresses itself). A UTF-8 byte-order mark
is dropped. Rows come as (where, row): where names the line, item or row for error messages; row is a dict, or a
string for a paragraph (and for a JSON string).
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from saescope.core.errors import InputError, SaescopeError

FORMATS = ("jsonl", "json", "csv", "tsv", "txt", "md", "parquet", "arrow")
SUFFIXES = tuple(f".{f}" for f in FORMATS)
PREFERRED_LISTS = ("examples", "data")

Row = tuple[str, object]


class Schema(NamedTuple):
    columns: tuple[str, ...]  # names for a header-less table
    require: str | None  # a column the header must have
    raw: bool = False  # tables: every row as its list of cells, the header first (repeated or missing cells kept)


def _check_columns(names: list[str], schema: Schema, origin: str, what: str) -> None:
    if schema.require is not None and schema.require not in names:
        raise InputError(f"{origin}: no column {schema.require!r} ({what} {', '.join(names) or 'nothing'})")


def row_format(name: str) -> str | None:
    """The format of a file by its name (`x.jsonl.gz` -> 'jsonl'), or None when it is not one saescope reads."""
    lower = name.lower().removesuffix(".gz")
    return next((f for f in FORMATS if lower.endswith(f".{f}")), None)


def suffix_of(name: str) -> str:
    lower = name.lower().removesuffix(".gz")
    return "." + row_format(name) if row_format(name) else (Path(lower).suffix or "(none)")


def iter_rows(source: str | Path, *, columns: tuple[str, ...] = (), require: str | None = None, raw: bool = False,
              open_binary: Callable[[], IO[bytes]] | None = None, origin: str | None = None) -> Iterator[Row]:
    """The rows of one file, streamed. `require`: a column that a table's header (or a Parquet/Arrow schema) must
    have, checked before the first row. `raw` (csv, tsv): each row as its list of cells, the header line first, for
    readers that check the table's shape themselves (a repeated column name, a short row). `open_binary` reads
    something that is not a plain file (a member of a zip); `origin` names it in errors (default: the path). Reading
    errors become one line naming the file: they may surface while a trainer iterates, so nothing here escapes as a
    bare OSError or UnicodeDecodeError."""
    name, origin = Path(source).name, origin or str(source)
    fmt = row_format(name)
    if fmt is None:
        raise InputError(f"{origin}: unsupported file type {suffix_of(name)!r}: use {', '.join(FORMATS)} (optionally .gz)")
    if fmt == "parquet" and name.lower().endswith(".gz"):
        raise InputError(f"{origin}: a Parquet file compresses itself; give it without .gz")
    opener = open_binary or (lambda: open(source, "rb"))
    try:
        with opener() as binary:
            stream = gzip.GzipFile(fileobj=binary) if name.lower().endswith(".gz") else binary
            yield from _READERS[fmt](stream, origin, Schema(columns, require, raw))
    except SaescopeError:
        raise
    except (OSError, EOFError, zlib.error, csv.Error) as exc:  # gzip.BadGzipFile is an OSError; EOFError: truncated .gz
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise InputError(f"{origin}: cannot read it: {detail} (corrupt or truncated?)") from exc


def _lines(stream: IO[bytes], origin: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of UTF-8 bytes, a line at a time; a byte-order mark on the first line is dropped."""
    for n, raw in enumerate(stream, 1):
        try:
            yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{origin} line {n}: not UTF-8 text (byte {exc.start + 1}: {exc.reason}); is it a binary file?") from exc


def _json(text: str, origin: str, first_line: int = 1) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{origin} line {first_line + exc.lineno - 1}: not valid JSON ({exc.msg})") from exc


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Documents of plain text, streamed: blank lines separate them."""
    doc: list[str] = []
    for line in itertools.chain(lines, [""]):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).strip()
            doc.clear()


def _text_rows(stream: IO[bytes], origin: str, _schema: Schema) -> Iterator[Row]:
    for i, doc in enumerate(paragraphs(line for _, line in _lines(stream, origin)), 1):
        yield f"paragraph {i}", doc


def _jsonl_rows(stream: IO[bytes], origin: str, _schema: Schema) -> Iterator[Row]:
    for n, line in _lines(stream, origin):
        if line.strip():
            yield f"line {n}", _json(line, origin, n)


def _json_rows(stream: IO[bytes], origin: str, _schema: Schema) -> Iterator[Row]:
    text = "".join(line for _, line in _lines(stream, origin))
    if not text.strip():
        return
    data = _json(text, origin)
    if isinstance(data, dict):  # e.g. {"examples": [...]} as BIG-Bench-Hard ships, {"items": [...]}
        lists = [k for k, v in data.items() if isinstance(v, list)]
        preferred = [k for k in PREFERRED_LISTS if k in lists]
        if len(lists) > 1 and not preferred:
            raise InputError(f"{origin}: the object holds several lists ({', '.join(lists[:5])}); put the rows under "
                             f"'examples' or 'data', or give the list alone")
        data = data[(preferred or lists)[0]] if lists else None
    if not isinstance(data, list):
        raise InputError(f"{origin}: a JSON file must hold a list of rows, or an object holding one list")
    for i, row in enumerate(data, 1):
        yield f"item {i}", row


def _table_rows(stream: IO[bytes], origin: str, schema: Schema, delimiter: str) -> Iterator[Row]:
    lines = (line for _, line in _lines(stream, origin))
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = list(schema.columns)
    if header:
        _check_columns(header, schema, origin, "its columns are")
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):  # blank lines, leading ones too (TruthfulQA's CSV starts with one)
                continue
            if schema.raw:
                yield f"line {reader.line_num}", [c.lstrip("\ufeff") if not header else c for c in cells]
                header = header or ["header"]
                continue
            if not header:
                header = [c.lstrip("\ufeff").strip() for c in cells]  # a BOM after leading blank lines too (TruthfulQA)
                _check_columns(header, schema, origin, "the header has")
                continue
            yield f"line {reader.line_num}", dict(zip(header, cells))
    except csv.Error as exc:  # e.g. a field over the csv module's size limit: a binary file, or an unclosed quote
        raise InputError(f"{origin} line {reader.line_num}: not a readable table ({exc})") from exc


def _csv_rows(stream: IO[bytes], origin: str, schema: Schema) -> Iterator[Row]:
    yield from _table_rows(stream, origin, schema, ",")


def _tsv_rows(stream: IO[bytes], origin: str, schema: Schema) -> Iterator[Row]:
    yield from _table_rows(stream, origin, schema, "\t")


def _record_batches(batches: Iterable, schema, wanted: Schema, origin: str) -> Iterator[Row]:
    _check_columns(list(schema.names), wanted, origin, "has")
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def _parquet_rows(stream: IO[bytes], origin: str, wanted: Schema) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(stream)
        yield from _record_batches(table.iter_batches(), table.schema_arrow, wanted, origin)  # a row group at a time
    except pa.ArrowException as exc:
        raise InputError(f"{origin}: not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def _arrow_rows(stream: IO[bytes], origin: str, wanted: Schema) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.ipc

    try:
        reader = pyarrow.ipc.open_stream(stream)
        yield from _record_batches(reader, reader.schema, wanted, origin)
    except pa.ArrowException as exc:
        raise InputError(f"{origin}: not a readable Arrow stream ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "tsv": _tsv_rows, "txt": _text_rows,
            "md": _text_rows, "parquet": _parquet_rows, "arrow": _arrow_rows}
