"""One writer per run folder: an OS file lock (flock) on RUN/.lock, held for the life of the writer.

Every command that writes into a run folder (training, evaluation, quality, every application's output) holds the
lock of the run folder it writes into while it works; a second writer refuses at once, naming the holder (pid, host,
command, since when), and writes nothing. The kernel releases an flock when its process dies, however it dies, so a
lock file left by a killed process is stale by construction: the next writer takes it over and writes its own holder
line. A writer removes its lock file when it is done (and the folder, when it made it and nothing else went in), so
a refused or finished command leaves no trace; a writer that locked a file another has meanwhile removed sees that
the path no longer names its file and locks again.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from saescope.core.errors import SaescopeError

LOCK_NAME = ".lock"


def run_folder_of(path: str | Path, *, folder: bool) -> Path:
    """The run folder a write to PATH belongs to: the nearest folder at or above it that holds a run (a training run or
    an SAE folder), else the folder written into itself (PATH, or its parent for a file)."""
    start = Path(path).expanduser().resolve()
    here = start if folder else start.parent
    for candidate in (here, *here.parents):
        if (candidate / "train.json").exists() or (candidate / "latest").exists() or any(candidate.glob("layer*.json")):
            return candidate
    return here


class RunLock:
    """`with RunLock(folder, "saescope eval"):` holds FOLDER's lock or refuses (SaescopeError naming the holder)."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder).expanduser().resolve()
        self.command = command or " ".join(["saescope", *sys.argv[1:]])[:300]
        self._file = None
        self._made = False

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def holder(self) -> dict:
        """What the lock file says of its holder ({} when unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        self._made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the life of the lock)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                self._tidy()
                raise SaescopeError(self._busy()) from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the one there now
                if os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                            "since": time.time()}) + "\n")
        f.flush()
        self._file = f
        return self

    def _busy(self) -> str:
        h = self.holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if isinstance(h.get("since"), (int, float)) else "?"
        return (f"{self.folder} is in use by another saescope process (pid {h.get('pid', '?')} on {h.get('host', '?')}, since "
                f"{since}: {str(h.get('command', '?'))[:120]}); wait for it to finish, or write elsewhere")

    def _tidy(self) -> None:
        """Remove the folder this lock made, when nothing but (at most) the lock went into it."""
        if self._made:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiter then locks a file no longer in the folder, and retries
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            self._tidy()


def writing(path: str | Path, *, folder: bool, command: str | None = None) -> RunLock:
    """The lock to hold while writing PATH (a folder, or a file): its run folder's (run_folder_of)."""
    return RunLock(run_folder_of(path, folder=folder), command)


def holding_lock(run: Callable) -> Callable:
    """A command's run_*(config, ...) that holds the lock of the run folder it writes into while it runs: the folder
    its config names with `writes_into()` (see writing)."""

    @functools.wraps(run)
    def locked(cfg, *args, **kwargs):
        with writing(cfg.writes_into(), folder=True):
            return run(cfg, *args, **kwargs)

    return locked
