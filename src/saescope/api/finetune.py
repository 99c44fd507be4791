"""What SASFT and RL share around a TRL trainer, the one fine-tuning path: TRL and peft present, bf16 autocast where it
is fast, LoRA set-up, a JSONL log of every trainer log, the output folder (written as OUT.partial, renamed to OUT only
when complete) and the before/after table."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import escape


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


def jsonl_log(path: Path, extra: Callable[[], dict] | None = None):
    """A transformers TrainerCallback writing every log of the trainer as one JSON line (saescope.api.trainer_log):
    imported only here, since transformers' trainer module pulls in peft (2.5 s) and every command would pay for it."""
    from saescope.api.trainer_log import JsonlLog

    return JsonlLog(path, extra)


def before_after(summary: dict, keys: tuple[str, ...]) -> list[str]:
    """The held-out figures of a fine-tuning summary (heldout_before, heldout_after) as table lines."""
    rows = [(name, summary.get(f"heldout_{name}")) for name in ("before", "after")]
    rows = [(name, row) for name, row in rows if row]
    if not rows:
        return []
    n = rows[0][1].get("prompts", rows[0][1].get("n"))
    lines = [f"held-out ({n} prompts)   " + " ".join(f"{k:>17}" for k in keys)]
    for name, row in rows:
        lines.append(f"  {name:<21}" + " ".join(f"{row[k]:>17.3f}" if row.get(k) is not None else f"{'-':>17}" for k in keys))
    return lines


def refuse_nonempty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ParamError(f"{{}} {escape(str(out))} already holds files; choose a new folder", "out")


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


def sft_config(trl, output_dir: Path, device, *, max_steps: int, batch_size: int, lr: float, max_length: int, seed: int,
               progress: bool = True, warmup: bool = True):
    """TRL's SFTConfig as every supervised fine-tune of saescope runs it: logged every step, nothing saved by the trainer
    itself, bf16 autocast where it is fast, on the model's device."""
    return trl.SFTConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
                         learning_rate=lr, lr_scheduler_type="constant_with_warmup" if warmup else "constant",
                         warmup_steps=min(5, max_steps // 10) if warmup else 0,
                         logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
                         max_length=max_length, disable_tqdm=not progress, dataloader_num_workers=0,
                         use_cpu=device.type == "cpu", bf16=mixed_bf16(device), fp16=False, gradient_checkpointing=False)


def fine_tune(lm, texts: list[str], *, steps: int, lr: float = 1e-4, max_length: int = 128, batch_size: int = 4,
              seed: int = 0, progress: bool = True) -> list[float]:
    """A short full fine-tune of `lm` in place on plain texts (next-token loss, TRL's SFTTrainer as SASFT trains), to
    make a checkpoint pair to test transfer on. Returns the training loss per step."""
    trl = require_trl()
    import tempfile

    from datasets import Dataset

    if not texts:
        raise SaescopeError("no texts to fine-tune on")
    lm.model.requires_grad_(True)  # load_model freezes a model for inference
    with tempfile.TemporaryDirectory() as tmp:
        args = sft_config(trl, Path(tmp), lm.device, max_steps=steps, batch_size=batch_size, lr=lr, max_length=max_length,
                          seed=seed, progress=progress, warmup=False)
        args.dataset_text_field = "text"
        trainer = trl.SFTTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list([{"text": x} for x in texts]),
                                 processing_class=lm.tokenizer)
        trainer.train()
    lm.model.eval()
    lm.model.requires_grad_(False)
    return [float(row["loss"]) for row in trainer.state.log_history if "loss" in row]


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
