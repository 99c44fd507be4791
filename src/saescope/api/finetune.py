"""What SASFT and RL share around a TRL trainer: TRL and peft present, bf16 autocast where it is fast, LoRA set-up,
a JSONL log of every trainer log, and the output folder (written as OUT.partial, renamed to OUT only when complete)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saescope.core.errors import SaescopeError


def mixed_bf16(device: torch.device) -> bool:
    """Train in bf16 autocast (fp32 master weights) where bf16 is fast: CUDA with bf16, or a CPU with native bf16
    (saescope.core.system.cpu_lm_dtype, measured once per machine; SAESCOPE_CPU_DTYPE=fp32 turns it off). On a 2-core
    AMX CPU a LoRA step of SmolLM2 on 1k tokens takes 4.9 s in bf16 autocast against 7.9 s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from saescope.core.system import cpu_lm_dtype

        return cpu_lm_dtype() == torch.bfloat16
    return False


def require_trl():
    try:
        import peft  # noqa: F401
        import trl
    except ImportError as exc:
        raise SaescopeError(f"SASFT and RL need TRL and peft ({exc.name} is missing): pip install 'saescope[train]'") from None
    return trl


def _jsonl_log_class() -> type:
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

    JsonlLog.__module__, JsonlLog.__qualname__ = __name__, "JsonlLog"
    return JsonlLog


def __getattr__(name: str):
    # JsonlLog subclasses transformers' TrainerCallback, whose import pulls in peft (2.5 s): built on first use, so
    # that every `saescope` command (the CLI imports this module for SASFT's and RL's flags) does not pay for it.
    if name == "JsonlLog":
        cls = globals()["JsonlLog"] = _jsonl_log_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def refuse_nonempty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise SaescopeError(f"--out {out} already holds files; choose a new folder")


def partial_folder(out: Path) -> Path:
    """OUT.partial, fresh: everything is written there and renamed to OUT by `publish` once complete."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def lora_setup(model, lora: bool, rank: int):
    """The peft LoraConfig for the trainer (None for full fine-tuning), with the model's weights unfrozen or not:
    load_model freezes a model for inference, and peft unfreezes only its adapters."""
    model.requires_grad_(not lora)
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules="all-linear")


def train_and_save(trainer, partial: Path, tok, lora: bool):
    """Train, then save a plain Hugging Face folder (LoRA merged in, the adapter itself in adapter/). Returns the
    trained model (merged) and the training seconds."""
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model = trainer.model
    if lora:
        model.save_pretrained(partial / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    shutil.rmtree(partial / "trainer", ignore_errors=True)
    return model, seconds


def publish(partial: Path, out: Path, name: str, summary: dict) -> None:
    (partial / name).write_text(json.dumps(summary, indent=1))
    if out.exists():
        out.rmdir()
    partial.rename(out)
