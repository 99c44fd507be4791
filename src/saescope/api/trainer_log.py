"""The JSONL log of a transformers trainer (a TrainerCallback). A module of its own, imported only when a trainer runs:
transformers' trainer_callback imports its training arguments and peft, 2.5 s that a command line must not pay."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback


class JsonlLog(TrainerCallback):
    """Every log of the trainer as one JSON line (step, elapsed seconds, the logged values, and whatever `extra()`
    returns at that moment)."""

    def __init__(self, path: Path, extra: Callable[[], dict] | None = None):
        self.path, self.start, self.extra = Path(path), time.perf_counter(), extra
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {"step": state.global_step, "seconds": round(time.perf_counter() - self.start, 2), **(logs or {})}
        if self.extra is not None:
            row.update(self.extra())
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
