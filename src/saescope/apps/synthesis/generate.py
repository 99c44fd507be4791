"""Feature-driven data synthesis (Qwen-Scope report, section 6): write examples aimed at the target features a
dataset does not fire yet, and keep an example ONLY if it fires its target.

Per uncovered target, a prompt is built from the feature's evidence (its top contexts and the tokens its decoder
promotes, from a feature store) and the class the target stands for; the generator writes candidates (optionally
steered toward the feature when the generator is the SAEs' own model); each candidate is encoded and kept when the
target fires on it (max activation over its tokens, the first left out, > 0), labelled with the target's class.
Rounds go over the still-uncovered targets until the budget is spent or a round adds no coverage `patience`
times. The control spends the same budget on unguided generation (one plain prompt) and is scored the same way:
its kept examples are the candidates that fire at least one target the seed misses. Both arms record coverage
after each kept example, so they compare at equal budget (candidates generated) and at equal data (examples
added, the report's "15x less data" reading).

A steering strength is absolute (residual-stream units: decoder rows are unit-norm) or, with `steer_relative`, a
multiple of each target's own top activation in the feature store: features differ in scale by orders of
magnitude, so one absolute strength is too weak for some targets and wrecks the text for others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.api.scope import Scope
from saescope.apps.synthesis.coverage import Target
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.models import LoadedModel
from saescope.core.schema import Config, check_number, config_field, escape

CLASS_TEXT = {"positive": "a hateful or abusive sentence", "negative": "a harmless, non-abusive sentence"}
UNGUIDED = "Write one short sentence."


@dataclass(kw_only=True)
class SynthConfig(Config):
    """How candidates are generated and kept. The fields with help are `saescope synthesize`'s flags."""

    budget: int = config_field(400, "candidates generated in all", min=1)
    per_target: int = config_field(4, "candidates per target per round", min=1)
    max_new_tokens: int = config_field(32, "tokens per candidate", min=1)
    steer: str | float = config_field(0.0, "steer toward the target feature while generating (only with the SAEs' own "
                                      "model): a strength in the residual stream's units (8), or a multiple of each "
                                      "target's top activation in the feature store (2x; the layer's median top "
                                      "activation for a target the store never saw fire)")
    seed: int = config_field(0, "the seed of the generation", min=0)
    temperature: float = 1.0
    top_p: float = 0.95
    patience: int = 1
    contexts: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.temperature, "temperature", min=0, min_open=True)
        check_number(self.top_p, "top_p", min=0, max=1, min_open=True)
        check_number(self.patience, "patience", kind=int, min=1)
        self.strength()

    def strength(self) -> tuple[float, bool]:
        """(strength, relative): 8 or '8' -> (8.0, False), absolute; '2x' -> (2.0, True), times each target's top
        activation."""
        text = str(self.steer).strip().lower()
        relative = text.endswith("x")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            raise ParamError(f"{{}} {escape(repr(self.steer))}: give a number (8) or a multiple of the top activation (2x)",
                             "steer") from None
        return check_number(value, "steer", kind=float), relative and value != 0


def evidence_prompt(target: Target, evidence: dict | None) -> str:
    """The instruction for one target: the class to write, the feature's contexts and promoted tokens."""
    lines = [f"Write {CLASS_TEXT.get(target.label, 'a sentence')}, one line, in the style of these snippets."]
    if evidence:
        for ctx in evidence.get("contexts", []):
            lines.append(f"- {ctx.strip()[:160]}")
        words = [w.strip() for w in evidence.get("promoted", []) if w.strip()]
        if words:
            lines.append(f"Use words such as: {', '.join(words[:8])}.")
    return "\n".join(lines)


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


@torch.no_grad()
def generate(lm: LoadedModel, prompt: str, n: int, cfg: SynthConfig, generator: torch.Generator | None = None) -> list[str]:
    """n sampled completions of `prompt` (first line, stripped; empty ones dropped)."""
    tok = lm.tokenizer
    enc = tok([_chat(tok, prompt)] * n, return_tensors="pt").to(lm.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = lm.model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, pad_token_id=pad)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    lines = [next((ln.strip(" -*\"'") for ln in t.splitlines() if ln.strip()), "") for t in texts]
    return [t for t in lines if len(t) > 3]


def fires(scope: Scope, texts: list[str], targets: list[Target]) -> np.ndarray:
    """(n_texts, n_targets) bool: which text fires which target."""
    if not texts:
        return np.zeros((0, len(targets)), dtype=bool)
    layers = sorted({t.layer for t in targets})
    out = np.zeros((len(texts), len(targets)), dtype=bool)
    for idx, got in scope.iter_pooled(texts, layers=layers, pool="max", skip_first_token=True, progress=False):
        for j, t in enumerate(targets):
            out[idx, j] = (got["sae"][t.layer][:, t.feature] > 0).cpu().numpy()
    return out


def synthesize(scope: Scope, generator: LoadedModel, targets: list[Target], covered: np.ndarray, cfg: SynthConfig, *,
               evidence: dict[tuple[int, int], dict] | None = None, progress: bool = True) -> dict:
    """Guided synthesis for the targets not yet `covered` (bool per target), and the unguided control with the same
    budget. Returns coverage before and after, per-target generated/kept counts, the kept examples and timings."""
    if covered.shape != (len(targets),):
        raise SaescopeError(f"covered must have one entry per target ({len(targets)}), got {covered.shape}")
    steer, relative = cfg.strength()
    steerable = steer != 0 and generator is scope.lm
    if steer != 0 and not steerable:
        raise ParamError("steering needs the generator to be the SAEs' own model (give no {})", "generator")
    strengths = _strengths(targets, covered, cfg, evidence) if steerable else {}
    torch.manual_seed(cfg.seed)
    guided = covered.copy()
    per_target = {i: {"generated": 0, "kept": 0} for i in range(len(targets))}
    kept: list[dict] = []
    guided_curve: list[float] = []  # coverage after each kept example
    spent, idle_rounds, rounds = 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=cfg.budget, desc="synthesize", unit="cand", disable=not progress)
    while spent < cfg.budget and not guided.all():
        rounds += 1
        before = int(guided.sum())
        for i in np.flatnonzero(~guided):
            if spent >= cfg.budget:
                break
            t = targets[i]
            n = min(cfg.per_target, cfg.budget - spent)
            prompt = evidence_prompt(t, (evidence or {}).get((t.layer, t.feature)))
            if steerable:
                with scope.steer(t.layer, {t.feature: strengths[i]}):
                    cands = generate(generator, prompt, n, cfg)
            else:
                cands = generate(generator, prompt, n, cfg)
            spent += n
            bar.update(n)
            per_target[i]["generated"] += n
            hit = fires(scope, cands, targets)
            for c, row in zip(cands, hit, strict=True):
                if row[i]:  # kept only if it fires its own target
                    kept.append({"text": c, "label": t.label, "target": [t.layer, t.feature]})
                    per_target[i]["kept"] += 1
                    guided |= row
                    guided_curve.append(float(guided.mean()))
        idle_rounds = idle_rounds + 1 if int(guided.sum()) == before else 0
        if idle_rounds >= cfg.patience:
            break
    bar.close()
    guided_seconds = time.perf_counter() - start

    start = time.perf_counter()
    unguided = covered.copy()
    plain_generated = 0
    unguided_curve: list[float] = []  # coverage after each kept example: its length is the kept count
    for _ in tqdm(range(0, spent, cfg.per_target * 4), desc="unguided control", disable=not progress):
        n = min(cfg.per_target * 4, spent - plain_generated)
        if n <= 0:
            break
        cands = generate(generator, UNGUIDED, n, cfg)
        plain_generated += n  # as the guided arm counts: candidates asked for, empty lines included
        for row in fires(scope, cands, targets):
            if (row & ~covered).any():  # the guided arm's rule: kept when it fires a target the seed misses
                unguided |= row
                unguided_curve.append(float(unguided.mean()))
    unguided_seconds = time.perf_counter() - start
    return {"n_targets": len(targets), "coverage_before": float(covered.mean()), "coverage_after": float(guided.mean()),
            "generated": spent, "kept": len(kept), "rounds": rounds, "seconds": guided_seconds,
            "per_target": [{"layer": targets[i].layer, "feature": targets[i].feature, "label": targets[i].label,
                            "covered_before": bool(covered[i]), "covered_after": bool(guided[i]), **per_target[i]}
                           for i in range(len(targets))],
            "examples": kept, "curve": guided_curve,
            "steer": {"strength": steer, "relative": relative,
                      "per_target": {f"{targets[i].layer}:{targets[i].feature}": v for i, v in strengths.items()}},
            "unguided": {"generated": plain_generated, "kept": len(unguided_curve), "coverage_after": float(unguided.mean()),
                         "curve": unguided_curve, "seconds": unguided_seconds, "prompt": UNGUIDED},
            "at_equal_data": at_equal_data(float(covered.mean()), guided_curve, unguided_curve)}


def _strengths(targets: list[Target], covered: np.ndarray, cfg: SynthConfig,
               evidence: dict[tuple[int, int], dict] | None) -> dict[int, float]:
    """The steering strength of each uncovered target."""
    todo = np.flatnonzero(~covered)
    steer, relative = cfg.strength()
    if not relative:
        return {int(i): steer for i in todo}
    out = {}
    for i in todo:
        t = targets[i]
        top = (evidence or {}).get((t.layer, t.feature), {}).get("max_activation")
        if not top:  # absent, or 0: the store never saw it fire, so it has no scale to steer by
            raise ParamError(f"{{}} {steer:g}x needs each target's top activation from a feature store; L{t.layer}/"
                             f"{t.feature} has none (build the store over more tokens, or give an absolute strength)", "steer")
        out[int(i)] = steer * float(top)
    return out


def at_equal_data(before: float, guided: list[float], unguided: list[float]) -> dict:
    """Coverage of each arm after the same number of added examples (the smaller arm's count)."""
    n = min(len(guided), len(unguided))
    return {"examples": n, "guided": guided[n - 1] if n else before, "unguided": unguided[n - 1] if n else before}
