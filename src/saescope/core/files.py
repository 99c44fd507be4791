"""File utilities every module shares: writes that never leave a half-written file, and JSON reads that
fail as one line naming the file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from saescope.core.errors import SaescopeError
from saescope.core.schema import Field, check_record


def temporary(path: Path) -> Path:
    """The name a file is written under before it is renamed into place: unique per process, so that two writers never
    write into one temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: Path, spec: dict[str, Field] | None = None) -> dict:
    """A JSON file, checked against `spec` (field types and ranges) when one is given."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SaescopeError(f"cannot read {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise SaescopeError(f"cannot read {path}: a folder, not a JSON file") from exc
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SaescopeError(f"cannot read {path}: not valid JSON (corrupt or truncated?)") from exc
    return check_record(obj, spec, str(path)) if spec is not None else obj


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def record_path(value: str, record: Path) -> str:
    """How a record at RECORD stores a path it names: a local path relative to the record's own folder, written
    './x' or '../x' so that it reads back from anywhere (resolve_record_path); anything else (a hub id) as given."""
    local = Path(value).expanduser()
    if not local.exists():
        return value
    rel = os.path.relpath(local.resolve(), Path(record).resolve().parent)
    return rel if rel.startswith("..") else f"./{rel}"


def resolve_record_path(value: str, record: Path) -> str:
    """A path read from the record at RECORD: './x' and '../x' are relative to the record's folder; an absolute path is
    itself; anything else is as given (a hub id, or a path written relative to the working folder by an older version)."""
    if value.startswith(("./", "../")) or value in (".", ".."):
        return str((Path(record).resolve().parent / value).resolve())
    return value
