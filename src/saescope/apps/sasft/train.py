"""SASFT inside the trainers a post-training team already uses: Hugging Face `Trainer` and TRL's `SFTTrainer`.

    from trl import SFTTrainer
    from saescope.apps.sasft import FeatureSuppression, sasft_trainer

    suppression = FeatureSuppression(sae, layer=15, features=[3, 7], lam=0.1)
    Trainer = sasft_trainer(SFTTrainer)          # or sasft_trainer(transformers.Trainer)
    trainer = Trainer(model=model, args=..., train_dataset=..., suppression=suppression)
    trainer.train()

The subclass overrides `compute_loss` (their public extension point): the parent computes CE on the forward it always
runs, the layer hook keeps that forward's layer output, and lambda * L_reduce is added. `log` adds the step's mean CE,
L_reduce and the target features' firing rate to what the trainer logs (and to train_log.jsonl through `JsonlLog`).
LoRA comes from peft as usual (SFTTrainer's `peft_config`, or `peft.get_peft_model` for `Trainer`).

`run_sasft(SASFTConfig)` is what `saescope sasft` calls: load, estimate alpha, train with SFTTrainer, save the model as
a plain Hugging Face folder (LoRA adapters merged into it; the adapter itself in `adapter/`), all written under
OUT.partial and renamed to OUT only when complete.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from saescope.api.behaviour import check_feature_ids, feature_spec
from saescope.api.controls import ControlOption
from saescope.api.finetune import (
    before_after,
    jsonl_log,
    lora_setup,
    partial_folder,
    publish,
    refuse_nonempty,
    require_trl,
    sft_config,
    train_and_save,
)
from saescope.api.scope import SAESource
from saescope.apps.sasft.loss import FeatureSuppression, estimate_alpha
from saescope.apps.sasft.measure import measure
from saescope.core.data.benchmarks import SharedDataOption
from saescope.core.data.responses import heldout_prompts, load_pairs
from saescope.core.errors import ParamError
from saescope.core.io.lock import holding_lock
from saescope.core.schema import REQUIRED, config_field


class _SASFTMixin:
    suppression: FeatureSuppression

    def __init__(self, *args, suppression: FeatureSuppression, **kwargs):
        super().__init__(*args, **kwargs)
        self.suppression = suppression
        self._sasft_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.suppression.watch(model):
            ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = self.suppression.loss(inputs.get("attention_mask"))
        stats = self.suppression.stats
        m = self._sasft_metrics["train" if model.training else "eval"]
        m["ce"].append(float(ce.detach()))
        m["l_reduce"].append(stats.l_reduce)
        m["fire_rate"].append(stats.fire_rate)
        total = ce + aux.to(ce.dtype)
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "" if mode == "train" else "eval_"
        logs.update({f"{prefix}sasft/{k}": sum(v) / len(v) for k, v in self._sasft_metrics[mode].items() if v})
        self._sasft_metrics[mode].clear()
        super().log(logs, *args, **kwargs)


def sasft_trainer(base: type) -> type:
    """`base` (transformers.Trainer, trl.SFTTrainer or a subclass) with SASFT's loss; it takes `suppression=`."""
    return type(f"SASFT{base.__name__}", (_SASFTMixin, base), {})


@dataclass(kw_only=True)
class SASFTConfig(SAESource, ControlOption, SharedDataOption):
    """`saescope sasft`: fine-tune (full or LoRA, TRL's SFTTrainer) with SASFT's loss: CE + lambda * sum ReLU(pre-activation
    - alpha) over the unwanted features. lambda 0 is plain SFT through the same code (the baseline); a control suppresses
    the control's directions of the same feature ids instead (the chance level)."""

    features: str | list[int] = config_field(REQUIRED, "feature ids (3,7) or a features file from `saescope discover`")
    layer: int | None = config_field(None, "the layer whose features are suppressed (default: the features file's)", min=0)
    lam: float = config_field(0.1, "lambda: weight of L_reduce (0 = plain SFT, the baseline)", min=0, flag="--lambda")
    data: str = config_field("responses:en:gpt-4o-2024-08-06", "prompt/response pairs (a file, or responses:LANG:MODEL)")
    prompt_column: str = config_field("prompt", "the prompt column of the data")
    response_column: str = config_field("response", "the response column of the data")
    lora: bool = config_field(False, "train LoRA adapters (peft) instead of every weight")
    lora_rank: int = config_field(16, "LoRA rank", min=1)
    max_steps: int = config_field(60, "optimiser steps", min=1)
    batch_size: int = config_field(4, "sequences per step", min=1)
    lr: float | None = config_field(None, "learning rate (default: 2e-5, or 2e-4 with LoRA)", min=0, min_open=True)
    max_length: int = config_field(384, "tokens per sequence (longer ones are cut)", min=1)
    alpha_batches: int = config_field(8, "training batches whose mean pre-activation sets alpha", min=1)
    eval_prompts: int = config_field(48, "held-out M-IFEval prompts measured before and after (loop rate, firing rate, "
                                     "held-out loss, ARC-Easy); 0: skip", min=0)
    arc: int = config_field(200, "ARC-Easy questions for the capability check (0: skip it)", min=0)
    skip_before: bool = config_field(False, "measure only after training (the before figures of the same base model and "
                                     "prompts are in an earlier run's sasft.json)")
    seed: int = config_field(0, "seed of the data order and the LoRA init", min=0)
    limit: int | None = config_field(None, "training pairs (default: all)", min=1)
    out: str = config_field(REQUIRED, "the fine-tuned model (a Hugging Face folder) and its logs", output="folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.features, self.layer = feature_spec(self.features, self.layer)  # resolved once: what the run records
        if self.layer is None:
            raise ParamError("{} is needed with feature ids (a features file names its layer)", "layer")
        if not self.features:
            raise ParamError("no feature to suppress: give {} (ids, or a features.json from `saescope discover`)", "features")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)

    def writes_into(self) -> Path:
        return Path(self.out).parent  # OUT is made whole by renaming OUT.partial: its parent holds both


def _dataset(pairs, chat: bool):
    from datasets import Dataset

    if chat:
        rows = [{"prompt": [{"role": "user", "content": p.prompt}], "completion": [{"role": "assistant", "content": p.response}]}
                for p in pairs]
    else:
        rows = [{"prompt": p.prompt + "\n", "completion": p.response} for p in pairs]
    return Dataset.from_list(rows)


def _alpha_batches(tok, pairs, chat: bool, batch_size: int, max_length: int, device):
    texts = []
    for p in pairs:
        if chat:
            texts.append(tok.apply_chat_template([{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.response}],
                                                 tokenize=False))
        else:
            texts.append(p.prompt + "\n" + p.response)
    side, tok.padding_side = tok.padding_side, "right"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length, add_special_tokens=not chat)
            yield {k: v.to(device) for k, v in enc.items()}
    finally:
        tok.padding_side = side


def _heldout(cfg: SASFTConfig) -> tuple[list[str], list, str]:
    """Held-out prompts (M-IFEval, test side, in the data's language) and, for a built-in responses set, its held-out
    pairs for the LM loss."""
    if not cfg.eval_prompts:
        return [], [], "en"
    builtin = cfg.data.startswith("responses:")
    lang = cfg.data.split(":")[1] if builtin else "en"
    pairs = []
    if builtin:
        base = ":".join(cfg.data.split(":")[:3])
        pairs = load_pairs(base + ":test", limit=cfg.eval_prompts, shared_data=cfg.shared_data)
    return heldout_prompts(lang, limit=cfg.eval_prompts, shared_data=cfg.shared_data), pairs, lang


@dataclass
class SASFTResult:
    path: Path
    summary: dict

    def text(self) -> str:
        s, cfg = self.summary, self.summary["config"]
        kind = "plain SFT" if cfg["lam"] == 0 else "SASFT" + (" on the control's directions" if cfg["control"] else "")
        return "\n".join([f"{kind} on {s['pairs']} pairs, {s['steps']} steps in {s['seconds']:.0f} s ({s['seconds_per_step']:.2f} "
                          f"s/step); features {cfg['features']} at layer {cfg['layer']}, alpha {s['suppression']['alpha']}",
                          *before_after(s, ("loop_rate", "distinct_2", "language_rate", "feature_fire_rate", "heldout_loss",
                                            "arc_easy")),
                          f"model: {self.path} (per-step CE, L_reduce and firing rate in {self.path}/train_log.jsonl)"])


@holding_lock
def run_sasft(cfg: SASFTConfig, *, progress: bool = True) -> SASFTResult:
    """Fine-tune with SASFT's loss (lam=0: plain SFT with the same logging, the baseline) and write the model to cfg.out,
    with the summary in OUT/sasft.json."""
    trl = require_trl()
    out = Path(cfg.out)
    refuse_nonempty(out)
    pairs = load_pairs(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column, limit=cfg.limit,
                       shared_data=cfg.shared_data)
    scope = cfg.load_scope([cfg.layer], check=lambda saes: check_feature_ids(saes[cfg.layer], cfg.features, cfg.layer))
    lm, sae = scope.lm, scope.sae(cfg.layer)
    control = cfg.load_control({cfg.layer: sae})
    suppression = FeatureSuppression(sae, layer=cfg.layer, features=cfg.features, lam=cfg.lam,
                                     control=control[cfg.layer] if control else None)
    suppression.sae.to(lm.device)
    tok = lm.tokenizer
    chat = bool(getattr(tok, "chat_template", None))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    estimate_alpha(lm.model, suppression, _alpha_batches(tok, pairs, chat, cfg.batch_size, cfg.max_length, lm.device),
                   max_batches=cfg.alpha_batches)
    prompts, test_pairs, lang = _heldout(cfg)
    # the figures always read the trained SAE's features, also in the control arm: did it move them?
    target = suppression if control is None else FeatureSuppression(sae, layer=cfg.layer, features=cfg.features, lam=cfg.lam)
    measure_kw = {"arc": cfg.arc, "language": lang, "shared_data": cfg.shared_data}
    before = measure(lm, target, prompts, test_pairs, **measure_kw) if prompts and not cfg.skip_before else None

    partial = partial_folder(out)
    peft_config = lora_setup(lm.model, cfg.lora, cfg.lora_rank)
    args = sft_config(trl, partial / "trainer", lm.device, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                      lr=cfg.learning_rate, max_length=cfg.max_length, seed=cfg.seed, progress=progress)
    trainer = sasft_trainer(trl.SFTTrainer)(model=lm.model, args=args, train_dataset=_dataset(pairs, chat), processing_class=tok,
                                            peft_config=peft_config, suppression=suppression,
                                            callbacks=[jsonl_log(partial / "train_log.jsonl")])
    lm.model, seconds = train_and_save(trainer, partial, tok, cfg.lora)
    after = measure(lm, target, prompts, test_pairs, **measure_kw) if prompts else None
    summary = {"config": asdict(cfg), "model": lm.name, "suppression": suppression.describe(),
               "pairs": len(pairs), "seconds": round(seconds, 1), "steps": cfg.max_steps,
               "seconds_per_step": round(seconds / cfg.max_steps, 3), "device": str(lm.device),
               "autocast": "bf16" if args.bf16 else "fp32",
               "heldout_before": before, "heldout_after": after}
    publish(partial, out, "sasft.json", summary)
    return SASFTResult(out, summary)
