"""`run_rl(RLConfig)`: GRPO with the DAPO loss in TRL's GRPOTrainer, with or without a steered negative per group,
and the held-out measurement before and after (exact-match accuracy, loop rate, distinct-2).

DAPO in TRL's terms: loss_type="dapo" (token-level normalisation), epsilon_high=0.28 (clip-higher), beta=0 (no KL
term). Dynamic sampling (dropping groups whose rewards are all equal) is not used, as in the report's steered runs; a
steered negative means no group is ever all-equal. Truncated completions are kept (a loop runs to the length limit;
masking them would hide exactly the rollouts the negative is about).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from saescope.api.behaviour import answer_and_measure
from saescope.core.errors import SaescopeError
from saescope.apps.rl.rollouts import SteeredNegativeReward, SteeredRollouts
from saescope.apps.rl.tasks import REWARDS, exact_match_reward, load_problems
from saescope.core.schema import check_number, config_field


@dataclass
class RLConfig:
    sae: str = config_field("", "SAE folder")
    layer: int = config_field(-1, "layer to steer at")
    feature: int = config_field(-1, "the feature whose decoder direction steers the negative rollout")
    alpha: float = config_field(0.0, "steering strength (residual-stream units; compare `saescope steer`'s typical norm)")
    data: str = config_field("svamp", "problems: svamp, gsm8k, mgsm_LANG, or a file with prompt and answer columns")
    reward: str = config_field("exact-match", "exact-match or format", choices=sorted(REWARDS))
    group_size: int = config_field(4, "G: rollouts per prompt (one of them steered)")
    prompts_per_step: int = config_field(2, "prompts per optimiser step")
    max_steps: int = config_field(20, "optimiser steps")
    max_new_tokens: int = config_field(96, "tokens per completion")
    temperature: float = config_field(1.0, "sampling temperature of the rollouts")
    lr: float = config_field(1e-4, "learning rate")
    lora: bool = config_field(False, "train LoRA adapters (peft)")
    lora_rank: int = config_field(16, "LoRA rank")
    steered_negative: bool = True
    random_direction: bool = config_field(False, "the control: a random direction of the same norm in place of the feature")
    penalty: float = config_field(1.0, "the steered rollout's reward is the group's lowest normal reward minus this")
    eval_problems: int = config_field(48, "held-out problems measured before and after (0: skip)")
    seed: int = config_field(0, "seed")
    model: str | None = None
    out: str = "runs/rl"

    def __post_init__(self) -> None:
        check_number(self.group_size, "--group-size", kind=int, min=2)
        for name in ("prompts_per_step", "max_steps", "max_new_tokens", "lora_rank"):
            check_number(getattr(self, name), "--" + name.replace("_", "-"), kind=int, min=1)
        check_number(self.eval_problems, "--eval-problems", kind=int, min=0)
        check_number(self.lr, "--lr", kind=float, min=0, min_open=True)
        check_number(self.temperature, "--temperature", kind=float, min=0, min_open=True)
        check_number(self.penalty, "--penalty", kind=float, min=0)
        check_number(self.alpha, "--alpha", kind=float)
        if self.reward not in REWARDS:
            raise SaescopeError(f"--reward {self.reward!r}: use {' or '.join(sorted(REWARDS))}")
        if self.steered_negative:
            check_number(self.layer, "--layer", kind=int, min=0)
            check_number(self.feature, "--feature", kind=int, min=0)
            if self.alpha == 0:
                raise SaescopeError("--alpha 0 steers nothing: give the strength of the steered negative")


def heldout_eval(lm, problems, *, max_new_tokens: int) -> dict:
    """Greedy answers to held-out problems: exact-match accuracy, loop rate, distinct-2, mean length in words."""
    texts, stats = answer_and_measure(lm, [p.prompt for p in problems], max_new_tokens=max_new_tokens)
    acc = exact_match_reward(None, texts, [p.answer for p in problems])
    return {"n": len(problems), "accuracy": sum(acc) / len(acc), "loop_rate": stats.loop_rate,
            "distinct_2": stats.distinct_2, "mean_units": stats.mean_units, "examples": texts[:3]}


class _RolloutLog:
    """What the last reward call saw, for train_log.jsonl: normal rollouts' reward and loop rate, the steered ones'."""

    def __init__(self, reward: SteeredNegativeReward):
        from saescope.api.behaviour import ends_in_loop
        from saescope.apps.rl.rollouts import _text

        self.values: dict[str, float] = {}
        inner = reward.base

        def observe(prompts, completions, **kw):
            out = inner(prompts, completions, **kw)
            steered = kw.get("is_steered") or [False] * len(completions)
            texts = [c if isinstance(c, str) else _text(c) for c in completions]
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


def run_rl(cfg: RLConfig, *, progress: bool = True) -> dict:
    from saescope.api.finetune import (
        JsonlLog,
        lora_setup,
        mixed_bf16,
        partial_folder,
        publish,
        refuse_nonempty,
        require_trl,
        train_and_save,
    )

    trl = require_trl()
    import os

    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; saescope pins its use in tests

    from saescope.core.io import load_saes
    from saescope.core.models import load_model
    from saescope.core.sae import random_like
    from saescope.api.scope import check_fit

    out = Path(cfg.out)
    refuse_nonempty(out)
    problems = load_problems(cfg.data, split="train")
    heldout = load_problems(cfg.data, split="test", limit=cfg.eval_problems) if cfg.eval_problems else []
    vector, model_name = None, cfg.model
    if cfg.steered_negative:
        saes = load_saes(cfg.sae, layers=[cfg.layer])
        if cfg.layer not in saes:
            raise SaescopeError(f"no SAE for layer {cfg.layer} in {cfg.sae} (have {sorted(load_saes(cfg.sae))})")
        sae = saes[cfg.layer]
        if not 0 <= cfg.feature < sae.cfg.d_sae:
            raise SaescopeError(f"feature {cfg.feature} is out of range: the layer {cfg.layer} SAE has features 0..{sae.cfg.d_sae - 1}")
        rows = (random_like(sae, seed=cfg.seed) if cfg.random_direction else sae).W_dec.detach()
        vector = cfg.alpha * rows[cfg.feature].float()  # decoder rows are unit-norm, trained and random alike
        model_name = model_name or sae.meta.get("model")
    elif cfg.sae:
        model_name = model_name or next(iter(load_saes(cfg.sae).values())).meta.get("model")
    lm = load_model(model_name)
    if cfg.steered_negative:
        check_fit(lm, {cfg.layer: sae})
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat = bool(getattr(tok, "chat_template", None))

    before = heldout_eval(lm, heldout, max_new_tokens=cfg.max_new_tokens) if heldout else None
    partial = partial_folder(out)
    rows = [{"prompt": [{"role": "user", "content": p.prompt}] if chat else p.prompt, "answer": p.answer} for p in problems]
    reward = SteeredNegativeReward(REWARDS[cfg.reward], group_size=cfg.group_size, penalty=cfg.penalty)
    rollout_log = _RolloutLog(reward)
    rollouts = SteeredRollouts(layer=max(cfg.layer, 0), vector=vector, group_size=cfg.group_size)
    peft_config = lora_setup(lm.model, cfg.lora, cfg.lora_rank)
    args = trl.GRPOConfig(output_dir=str(partial / "trainer"), max_steps=cfg.max_steps, learning_rate=cfg.lr,
                          per_device_train_batch_size=cfg.group_size * cfg.prompts_per_step, num_generations=cfg.group_size,
                          max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                          loss_type="dapo", epsilon_high=0.28, beta=0.0, logging_steps=1, save_strategy="no", report_to=[],
                          seed=cfg.seed, data_seed=cfg.seed, use_cpu=lm.device.type == "cpu", bf16=mixed_bf16(lm.device), fp16=False,
                          disable_tqdm=not progress, dataloader_num_workers=0, gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=lm.model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=peft_config, rollout_func=rollouts,
                              callbacks=[JsonlLog(partial / "train_log.jsonl", extra=rollout_log)])
    lm.model, seconds = train_and_save(trainer, partial, tok, cfg.lora)
    after = heldout_eval(lm, heldout, max_new_tokens=cfg.max_new_tokens) if heldout else None
    summary = {"config": asdict(cfg), "model": lm.name, "problems": len(problems), "steps": cfg.max_steps,
               "seconds": round(seconds, 1), "seconds_per_step": round(seconds / cfg.max_steps, 2),
               "negative": ("none" if vector is None else "random direction" if cfg.random_direction else f"feature {cfg.feature}"),
               "heldout_before": before, "heldout_after": after, "device": str(lm.device),
               "autocast": "bf16" if args.bf16 else "fp32"}
    publish(partial, out, "rl.json", summary)
    return summary
