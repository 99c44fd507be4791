"""`run_rl(RLConfig)`: GRPO with the DAPO loss in TRL's GRPOTrainer, with or without a steered negative per group,
and the held-out measurement before and after (exact-match accuracy, loop rate, distinct-2).

DAPO in TRL's terms: loss_type="dapo" (token-level normalisation), epsilon_high=0.28 (clip-higher), beta=0 (no KL
term). Dynamic sampling (dropping groups whose rewards are all equal) is not used, as in the report's steered runs; a
steered negative means no group is ever all-equal. Truncated completions are kept (a loop runs to the length limit;
masking them would hide exactly the rollouts the negative is about).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from saescope.api.behaviour import answer_and_measure, check_feature_ids, ends_in_loop, feature_spec
from saescope.api.controls import ControlOption
from saescope.api.finetune import (
    before_after,
    jsonl_log,
    lora_setup,
    mixed_bf16,
    partial_folder,
    publish,
    refuse_nonempty,
    require_trl,
    train_and_save,
)
from saescope.api.scope import SAESource, model_of
from saescope.apps.rl.rollouts import SteeredNegativeReward, SteeredRollouts
from saescope.apps.rl.tasks import REWARDS, exact_match_reward, load_problems, message_text
from saescope.core.data.benchmarks import SharedDataOption
from saescope.core.errors import ParamError
from saescope.core.io import load_saes
from saescope.core.io.lock import holding_lock
from saescope.core.models import load_model
from saescope.core.schema import REQUIRED, config_field, escape


@dataclass(kw_only=True)
class RLConfig(SAESource, ControlOption, SharedDataOption):
    """`saescope rl`: GRPO with the DAPO loss (TRL's GRPOTrainer), one rollout per group steered into a feature and given
    the group's lowest reward. Without a steered negative it is plain GRPO (the baseline); with a control, the negative
    is steered along the control's direction of the same feature id (the chance level)."""

    sae: str | None = config_field(None, "SAE folder (needed for the steered negative)")
    layer: int | None = config_field(None, "the layer to steer at (default: the features file's)", min=0)
    feature: str | int | None = config_field(None, "the feature whose decoder direction steers the negative rollout: an id, "
                                             "or a features file from `saescope discover` (its first selected feature and "
                                             "its layer)")
    alpha: float = config_field(0.0, "steering strength (residual-stream units; compare `saescope steer`'s typical norm)")
    data: str = config_field("svamp", "problems: svamp, gsm8k, mgsm_LANG, or a file with prompt and answer columns")
    reward: str = config_field("exact-match", "exact-match or format", choices=tuple(sorted(REWARDS)))
    group_size: int = config_field(4, "G: rollouts per prompt (one of them steered)", min=2)
    prompts_per_step: int = config_field(2, "prompts per optimiser step", min=1)
    max_steps: int = config_field(20, "optimiser steps", min=1)
    max_new_tokens: int = config_field(96, "tokens per completion", min=1)
    temperature: float = config_field(1.0, "sampling temperature of the rollouts", min=0, min_open=True)
    lr: float = config_field(1e-4, "learning rate", min=0, min_open=True)
    lora: bool = config_field(False, "train LoRA adapters (peft)")
    lora_rank: int = config_field(16, "LoRA rank", min=1)
    steered_negative: bool = config_field(True, "plain GRPO, every rollout sampled normally (the baseline)",
                                          flag="--no-steered-negative")
    penalty: float = config_field(1.0, "the steered rollout's reward is the group's lowest normal reward minus this", min=0)
    eval_problems: int = config_field(48, "held-out problems measured before and after (0: skip)", min=0)
    seed: int = config_field(0, "seed", min=0)
    out: str = config_field(REQUIRED, "the trained model (a Hugging Face folder) and its logs", output="folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature is not None:
            ids, self.layer = feature_spec(self.feature if isinstance(self.feature, str) else [self.feature], self.layer)
            if len(ids) != 1 and not str(self.feature).endswith(".json"):
                raise ParamError(f"{{}} {escape(str(self.feature))}: give one feature id", "feature")
            self.feature = ids[0]  # resolved once: what the run records
        if self.steered_negative:
            if not self.sae or self.layer is None or self.feature is None:
                raise ParamError("the steered negative needs {}, {} and {} (or give {})", "sae", "layer", "feature",
                                 "steered_negative")
            if self.alpha == 0:
                raise ParamError("{} 0 steers nothing: give the strength of the steered negative", "alpha")

    def writes_into(self) -> Path:
        return Path(self.out).parent  # OUT is made whole by renaming OUT.partial: its parent holds both


def heldout_eval(lm, problems, *, max_new_tokens: int) -> dict:
    """Greedy answers to held-out problems: exact-match accuracy, loop rate, distinct-2, mean length in words."""
    texts, stats = answer_and_measure(lm, [p.prompt for p in problems], max_new_tokens=max_new_tokens)
    acc = exact_match_reward(None, texts, [p.answer for p in problems])
    return {"n": len(problems), "accuracy": sum(acc) / len(acc), "loop_rate": stats.loop_rate,
            "distinct_2": stats.distinct_2, "mean_units": stats.mean_units, "examples": texts[:3]}


class _RolloutLog:
    """What the last reward call saw, for train_log.jsonl: normal rollouts' reward and loop rate, the steered ones'."""

    def __init__(self, reward: SteeredNegativeReward):
        self.values: dict[str, float] = {}
        inner = reward.base

        def observe(prompts, completions, **kw):
            out = inner(prompts, completions, **kw)
            steered = kw.get("is_steered") or [False] * len(completions)
            texts = [c if isinstance(c, str) else message_text(c) for c in completions]
            normal = [i for i, s in enumerate(steered) if not s]
            pushed = [i for i, s in enumerate(steered) if s]
            self.values = {"rollouts/normal_reward": sum(out[i] for i in normal) / max(len(normal), 1),
                           "rollouts/normal_loop_rate": sum(ends_in_loop(texts[i]) for i in normal) / max(len(normal), 1)}
            if pushed:
                self.values["rollouts/steered_loop_rate"] = sum(ends_in_loop(texts[i]) for i in pushed) / len(pushed)
            return out

        observe.__name__ = getattr(inner, "__name__", "reward")
        reward.base = observe

    def __call__(self) -> dict[str, float]:
        return self.values


@dataclass
class RLResult:
    path: Path
    summary: dict

    def text(self) -> str:
        s = self.summary
        return "\n".join([f"GRPO (DAPO loss), negative: {s['negative']}; {s['steps']} steps in {s['seconds']:.0f} s "
                          f"({s['seconds_per_step']:.1f} s/step)", *before_after(s, ("accuracy", "loop_rate", "distinct_2")),
                          f"model: {self.path} (per-step rewards and loop rates in {self.path}/train_log.jsonl)"])


@holding_lock
def run_rl(cfg: RLConfig, *, progress: bool = True) -> RLResult:
    trl = require_trl()
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; saescope pins its use in tests
    out = Path(cfg.out)
    refuse_nonempty(out)
    problems = load_problems(cfg.data, split="train", shared_data=cfg.shared_data)
    heldout = load_problems(cfg.data, split="test", limit=cfg.eval_problems, shared_data=cfg.shared_data) if cfg.eval_problems else []
    vector = None
    if cfg.steered_negative:
        scope = cfg.load_scope([cfg.layer], check=lambda saes: check_feature_ids(saes[cfg.layer], [cfg.feature], cfg.layer))
        lm, sae = scope.lm, scope.sae(cfg.layer)
        control = cfg.load_control({cfg.layer: sae})
        rows = (control[cfg.layer] if control else sae).W_dec.detach()
        vector = cfg.alpha * rows[cfg.feature].float()  # decoder rows are unit-norm, trained and random alike
    else:
        lm = load_model(cfg.model or (model_of(load_saes(cfg.sae), None, cfg.sae) if cfg.sae else None))
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat = bool(getattr(tok, "chat_template", None))

    before = heldout_eval(lm, heldout, max_new_tokens=cfg.max_new_tokens) if heldout else None
    partial = partial_folder(out)
    rows = [{"prompt": [{"role": "user", "content": p.prompt}] if chat else p.prompt, "answer": p.answer} for p in problems]
    reward = SteeredNegativeReward(REWARDS[cfg.reward], group_size=cfg.group_size, penalty=cfg.penalty)
    rollout_log = _RolloutLog(reward)
    rollouts = SteeredRollouts(layer=cfg.layer or 0, vector=vector, group_size=cfg.group_size)
    peft_config = lora_setup(lm.model, cfg.lora, cfg.lora_rank)
    args = trl.GRPOConfig(output_dir=str(partial / "trainer"), max_steps=cfg.max_steps, learning_rate=cfg.lr,
                          per_device_train_batch_size=cfg.group_size * cfg.prompts_per_step, num_generations=cfg.group_size,
                          max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                          loss_type="dapo", epsilon_high=0.28, beta=0.0, logging_steps=1, save_strategy="no", report_to=[],
                          seed=cfg.seed, data_seed=cfg.seed, use_cpu=lm.device.type == "cpu", bf16=mixed_bf16(lm.device), fp16=False,
                          disable_tqdm=not progress, dataloader_num_workers=0, gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=lm.model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=peft_config, rollout_func=rollouts,
                              callbacks=[jsonl_log(partial / "train_log.jsonl", extra=rollout_log)])
    lm.model, seconds = train_and_save(trainer, partial, tok, cfg.lora)
    after = heldout_eval(lm, heldout, max_new_tokens=cfg.max_new_tokens) if heldout else None
    summary = {"config": asdict(cfg), "model": lm.name, "problems": len(problems), "steps": cfg.max_steps,
               "seconds": round(seconds, 1), "seconds_per_step": round(seconds / cfg.max_steps, 2),
               "negative": ("none" if vector is None else f"control feature {cfg.feature}" if cfg.control else f"feature {cfg.feature}"),
               "heldout_before": before, "heldout_after": after, "device": str(lm.device),
               "autocast": "bf16" if args.bf16 else "fp32"}
    publish(partial, out, "rl.json", summary)
    return RLResult(out, summary)
