"""Steered negative rollouts (Qwen-Scope report section 8) for TRL's GRPOTrainer.

Of the G completions of each prompt, G-1 are sampled normally and one with h <- h + alpha * d added to decoder layer
L's output at every step (d: a unit SAE decoder row, steered INTO repetition), and that one always gets the lowest
reward of its group: min of the group's normal rewards minus `penalty` (1.0 by default, so it is strictly the lowest
even when every normal rollout scores the same, and the group always carries a learning signal). The policy is then
trained on it like any other rollout: its log-probabilities are those of the unsteered model, so the update pushes the
model away from what the steered state produced.

    rollouts = SteeredRollouts(layer=15, vector=alpha * sae.W_dec[f], group_size=4)
    reward = SteeredNegativeReward(exact_match_reward, group_size=4)
    GRPOTrainer(..., reward_funcs=[reward], rollout_func=rollouts)

TRL hands `rollout_func` the batch's prompts with each prompt repeated G times in a row; generation goes through
`model.generate` (not vLLM) so that the layer hook applies. `is_steered` reaches the reward functions as an extra
column. With `vector=None` every rollout is normal (the plain GRPO control, through the same code path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from saescope.api.steer import steering
from saescope.apps.rl.tasks import message_text
from saescope.core.errors import SaescopeError


class SteeredRollouts:
    """TRL `rollout_func(prompts, trainer)`: G-1 normal completions and one steered one per prompt group."""

    def __init__(self, *, layer: int, vector: Tensor | None, group_size: int):
        if group_size < 2:
            raise SaescopeError(f"the group size G must be >= 2 (a group-relative advantage needs two rollouts), got {group_size}")
        self.layer, self.vector, self.group_size = layer, vector, group_size
        self.__name__ = "steered_rollouts"

    def _prompt_ids(self, tok, prompt) -> list[int]:
        if isinstance(prompt, str):
            return tok(prompt, add_special_tokens=True)["input_ids"]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _generate(self, model, tok, prompts: list[list[int]], config, steer: bool) -> list[list[int]]:
        if not prompts:
            return []
        device = next(model.parameters()).device
        width = max(map(len, prompts))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            if steer:
                with steering(model, layer=self.layer, vector=self.vector.to(device)):
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        eos = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id or tok.eos_token_id])
        result = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            result.append(row if cut is None else row[: cut + 1])  # up to and with the first EOS, as TRL keeps it
        return result

    def __call__(self, prompts: Sequence, trainer) -> dict:
        from trl.models import unwrap_model_for_generation

        g = self.group_size
        if len(prompts) % g:
            raise SaescopeError(f"{len(prompts)} prompts in the batch, not a multiple of the group size {g}")
        for start in range(0, len(prompts), g):
            if any(message_text(p) != message_text(prompts[start]) for p in prompts[start : start + g]):
                raise SaescopeError("the batch's prompts are not in groups of G identical ones; GRPOTrainer's sampler "
                                    "should repeat each prompt G times in a row")
        tok = trainer.processing_class
        prompt_ids = [self._prompt_ids(tok, p) for p in prompts]
        steered = [self.vector is not None and i % g == g - 1 for i in range(len(prompts))]
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            normal = self._generate(model, tok, [p for p, s in zip(prompt_ids, steered) if not s], trainer.generation_config, False)
            pushed = self._generate(model, tok, [p for p, s in zip(prompt_ids, steered) if s], trainer.generation_config, True)
        normal_it, pushed_it = iter(normal), iter(pushed)
        completions = [next(pushed_it) if s else next(normal_it) for s in steered]
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None, "is_steered": steered}


class SteeredNegativeReward:
    """A TRL reward function wrapping `base` (same signature: prompts, completions, **columns -> list of floats):
    the steered rollout of each group gets min(the group's normal rewards) - penalty. A reward function that raises
    is reported with the prompt it failed on; the trainer stops before the optimiser step, so the weights stay those
    of the last completed step."""

    def __init__(self, base: Callable[..., list[float]], *, group_size: int, penalty: float = 1.0):
        if group_size < 2:
            raise SaescopeError(f"the group size G must be >= 2, got {group_size}")
        self.base, self.group_size, self.penalty = base, group_size, penalty
        self.__name__ = getattr(base, "__name__", "reward")

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        try:
            rewards = [float(r) for r in self.base(prompts, completions, **kwargs)]
        except SaescopeError:
            raise
        except Exception as exc:
            where = _first_failure(self.base, prompts, completions, kwargs)
            raise SaescopeError(f"the reward function {self.__name__} failed{where}: {type(exc).__name__}: {exc}") from exc
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if len(rewards) != len(completions) or bad:
            raise SaescopeError(f"the reward function {self.__name__} returned "
                                + (f"{len(rewards)} rewards for {len(completions)} completions" if not bad else
                                   f"{rewards[bad[0]]} on prompt {message_text(prompts[bad[0]])[:80]!r}"))
        steered = kwargs.get("is_steered") or [False] * len(rewards)
        g = self.group_size
        for start in range(0, len(rewards), g):
            group = range(start, min(start + g, len(rewards)))
            normal = [rewards[i] for i in group if not steered[i]]
            for i in group:
                if steered[i]:
                    rewards[i] = (min(normal) if normal else 0.0) - self.penalty
        return rewards


def _first_failure(base, prompts, completions, kwargs) -> str:
    """' on prompt N (text...)': the first completion that makes `base` raise on its own, for the error message."""
    for i in range(len(completions)):
        one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        try:
            base([prompts[i]], [completions[i]], **one)
        except Exception:
            return f" on prompt {i} ({message_text(prompts[i])[:80]!r})"
    return f" on a batch of {len(completions)} completions (first prompt: {message_text(prompts[0])[:80]!r}; each alone passed)"
