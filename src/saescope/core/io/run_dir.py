"""A run folder, named in one place: every file and subfolder that saescope writes into a run, and where each
command writes by default. The folder owns itself: every path is relative to where the folder is now, so a moved
or copied run keeps working, and nothing recorded inside it (train.json's `out`) can send reads or writes to
another folder.

    train.json  train_log.jsonl  train_summary.json  latest  checkpoints/step-NNNNNNNN/   saescope train
    eval.json  quality.json                                                              saescope eval | quality
    control/  trust/  redundancy/  features/  inspect/  report.html                      the applications
    toxicity/  behaviour/  sasft/  rl/                                                   round 2's applications
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from saescope.core.errors import SaescopeError

_CHECKPOINT = re.compile(r"checkpoints/step-(\d{8})")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def train_config(self) -> Path:
        return self.path / "train.json"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def quality(self) -> Path:
        return self.path / "quality.json"

    @property
    def pointer(self) -> Path:
        return self.path / "latest"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    # Application outputs: one subfolder each, so that a run folder holds everything made from its SAEs.
    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def trust(self) -> Path:
        return self.path / "trust"

    @property
    def redundancy(self) -> Path:
        return self.path / "redundancy"

    @property
    def features(self) -> Path:
        return self.path / "features"

    @property
    def inspect(self) -> Path:
        return self.path / "inspect"

    @property
    def toxicity(self) -> Path:
        return self.path / "toxicity"

    @property
    def behaviour(self) -> Path:
        return self.path / "behaviour"

    @property
    def sasft(self) -> Path:
        return self.path / "sasft"

    @property
    def rl(self) -> Path:
        return self.path / "rl"

    @classmethod
    def of_sae(cls, spec: str | Path) -> RunDir:
        """Where outputs made from the SAEs at SPEC go by default: their folder when SPEC is one (a run, a checkpoint,
        any SAE folder), else the working folder (a hub id or a single SAE file)."""
        path = Path(spec).expanduser()
        return cls(path if path.is_dir() else Path("."))

    def checkpoint_name(self, step: int) -> str:
        return f"checkpoints/step-{step:08d}"

    def staging(self, step: int, rank: int) -> Path:
        """Where a rank writes its part of a checkpoint before the folder is assembled: named per process too, so that
        no two writers ever share it (a second writer is refused by the folder's lock besides)."""
        return self.checkpoints / f".staging-{step:08d}-rank{rank}-{os.getpid()}"

    def latest_name(self) -> str | None:
        """The checkpoint `latest` names (relative to the folder), or None before the first checkpoint. A pointer
        that names anything but a checkpoint of this folder is refused: it would read or rotate another folder."""
        if not self.pointer.is_file():
            return None
        try:
            name = self.pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SaescopeError(f"{self.pointer}: unreadable ({type(exc).__name__})") from exc
        if not _CHECKPOINT.fullmatch(name):
            raise SaescopeError(f"{self.pointer}: names {name[:80]!r}, not a checkpoint of this folder (checkpoints/step-NNNNNNNN)")
        return name

    def latest(self) -> Path | None:
        """The latest complete checkpoint folder, or None before the first checkpoint."""
        name = self.latest_name()
        if name is None:
            return None
        folder = self.path / name
        if not folder.is_dir():
            raise SaescopeError(f"{self.path}: `latest` points at {name}, which is missing")
        return folder

    def has_run(self) -> bool:
        """A run was made here: a checkpoint pointer, or the config written with every checkpoint (even if the pointer
        was lost). Such a folder is continued with --resume, never started over."""
        return self.pointer.exists() or self.train_config.exists()
