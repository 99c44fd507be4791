"""Feature absorption, SAEBench's first-letter metric (Chanin et al. 2024, "A is for Absorption"), beside the control.

An SAE absorbs a feature when a latent that should fire for it (the "starts with S" latent) stays silent on some
inputs because another, more specific latent (" snake") carries the feature there instead. The ground truth is a
linear probe for the first letter of a word, read where the word sits in an in-context spelling prompt:

    {ex} has the first letter: E\\n  (x icl_examples, other words)  {word} has the first letter:

Words are single vocabulary tokens made of a space and 2+ ASCII letters (" snake"), a seeded sample split into
train and test words. Prompts are built from token ids, so the word is one token at a known position. Per layer:

    probe        26 one-vs-rest logistic probes on the residual stream at the word (train words): the ground truth;
                 its macro F1 on test words says whether first letters are linearly readable here at all
    main latents per letter, latents ranked by class-mean difference on train words (the ranking of saescope's sparse
                 probing; SAEBench ranks by an L1 probe); k grows while a balanced logistic regression on the top k
                 gains more than 0.03 test F1 (SAEBench's feature-split rule); k - 1 is the number of splits
    absorption   on each test word its letter's probe gets right:
                 fraction  the share of the probe projection carried by up to 3 other latents aligned with the probe
                           (cos >= 0.1) instead of the main latents (SAEBench's mean absorption fraction)
                 full      the main latents are silent while the latent projecting most on the probe (cos >= 0.025)
                           carries >= 40% of the word's probe projection (SAEBench's full-absorption rate)

Means are over letters with at least MIN_WORDS scored test words. Lower absorption is better; a random control barely
has latents aligned with a probe, so its absorption is low for want of features, not for their quality: read it with
the main latents' F1 (`main_f1`), which is where trained features should win.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saescope.api.controls import named_controls
from saescope.api.probing import fit_logistic
from saescope.core.errors import SaescopeError
from saescope.core.models import LoadedModel, capture, token_strings
from saescope.core.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter:"
MIN_WORDS = 5  # scored test words a letter needs to count in the means
EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionConfig:
    n_words: int = 1200
    icl_examples: int = 4
    test_share: float = 0.3
    max_k: int = 10
    f1_jump: float = 0.03  # SAEBench's feature-split threshold
    full_cos: float = 0.025  # the top projecting latent's cosine to the probe (full absorption)
    fraction_cos: float = 0.1  # each absorbing latent's cosine to the probe (absorption fraction)
    projection_share: float = 0.4  # of the probe projection the absorbing latent(s) must carry
    max_absorbers: int = 3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_words < 100:
            raise SaescopeError(f"absorption needs at least 100 words, got n_words={self.n_words}")
        if not 0 < self.test_share < 1:
            raise SaescopeError(f"test_share must be in (0, 1), got {self.test_share}")
        if self.icl_examples < 0 or self.max_k < 1:
            raise SaescopeError("icl_examples must be >= 0 and max_k >= 1")


@dataclass(frozen=True)
class SpellingSet:
    """Words (token id, text), their first letters (0-25), which are test words, and each word's prompt."""

    word_ids: list[int]
    words: list[str]
    letters: np.ndarray
    test: np.ndarray
    prompts: list[list[int]]
    word_pos: list[int]


def spelling_set(tokenizer, cfg: AbsorptionConfig) -> SpellingSet:
    """A seeded sample of single-token words, their train/test split and their spelling prompts (examples are drawn
    from the train words, so no test word is ever shown with its answer)."""
    texts = token_strings(tokenizer, list(range(len(tokenizer))))
    pool = sorted({t[1:].lower(): i for i, t in enumerate(texts) if re.fullmatch(r" [A-Za-z]{2,}", t)}.items())
    if len(pool) < cfg.n_words:
        raise SaescopeError(f"the tokenizer has {len(pool)} single-token words, fewer than n_words={cfg.n_words}")
    rng = np.random.default_rng([cfg.seed, zlib.crc32(b"absorption")])
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), cfg.n_words, replace=False))]
    words, word_ids = [w for w, _ in chosen], [i for _, i in chosen]
    letters = np.array([LETTERS.index(w[0]) for w in words])
    test = rng.random(len(words)) < cfg.test_share
    suffix = tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    answers = [tokenizer(" " + c.upper(), add_special_tokens=False)["input_ids"] for c in LETTERS]
    train_idx = np.flatnonzero(~test)
    # The BOS the tokenizer puts before text, if any (Gemma, Llama): without it the first example word would be the
    # attention sink. Prompts are built from ids, so it is added here as the tokenizer would add it.
    bos = tokenizer.bos_token_id
    start = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    prompts, positions = [], []
    for i, word_id in enumerate(word_ids):
        examples = rng.choice(train_idx[train_idx != i], cfg.icl_examples, replace=False)
        ids: list[int] = list(start)
        for e in examples:
            ids += [word_ids[e], *suffix, *answers[letters[e]], *newline]
        positions.append(len(ids))
        prompts.append(ids + [word_id, *suffix])
    return SpellingSet(word_ids, words, letters, test, prompts, positions)


@torch.no_grad()
def word_activations(lm: LoadedModel, data: SpellingSet, layers: list[int], *, batch_size: int = 32,
                     progress: bool = True) -> dict[int, Tensor]:
    """Per layer, (n_words, d_model) float32: the residual stream at each word's token in its prompt."""
    out: dict[int, list[Tensor]] = {n: [] for n in layers}
    pad = lm.tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(data.prompts), batch_size), desc="absorption prompts", disable=not progress):
        # up to the word's token: a causal LM's state there does not depend on the suffix after it
        batch = [p[: pos + 1] for p, pos in zip(data.prompts[start : start + batch_size],
                                                 data.word_pos[start : start + batch_size], strict=True)]
        width = max(map(len, batch))
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch], device=lm.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=lm.device)
        acts = capture(lm.model, ids, layers, attention_mask=mask)
        rows = torch.arange(len(batch), device=lm.device)
        cols = torch.tensor(data.word_pos[start : start + batch_size], device=lm.device)
        for n in layers:
            out[n].append(acts[n][rows, cols].float().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def _f1(pred: Tensor, truth: Tensor) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(float(pred.sum()) + float(truth.sum()), 1.0)


def main_latents(train: Tensor, held_out: Tensor, y_train: Tensor, y_held_out: Tensor, ranked: Tensor,
                 cfg: AbsorptionConfig) -> tuple[list[int], float]:
    """A letter's main latents (the k-sparse rule in the module docstring) and their probe's test F1: `train` and
    `held_out` are the words' codes (words, d_sae), `ranked` the latents by class-mean difference on train."""
    best, chosen = -math.inf, ranked[:1]
    for k in range(1, cfg.max_k + 1):
        feats = ranked[:k]
        probe = fit_logistic(train[:, feats], y_train, balanced=True)
        f1 = _f1(probe.scores(held_out[:, feats])[:, 0] > 0, y_held_out)
        if f1 <= best + cfg.f1_jump:
            break
        best, chosen = f1, feats
    return chosen.tolist(), best


def class_mean_differences(codes: Tensor, onehot: Tensor) -> Tensor:
    """(classes, d_sae): each class's mean code minus the mean code of the rest, for every class in two products."""
    in_class = onehot.to(codes.dtype)
    count = in_class.sum(0)[:, None]
    sums = in_class.T @ codes
    return sums / count.clamp_min(1) - (codes.sum(0) - sums) / (len(codes) - count).clamp_min(1)


def absorption_of(acts: Tensor, codes: Tensor, sae: SAE, direction: Tensor, main: list[int],
                  cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """Per word (rows of acts / codes): SAEBench's absorption fraction and whether it is full absorption, for the
    probe `direction` (unit) and the letter's `main` latents."""
    W = sae.W_dec.detach().float().cpu()
    cos = (W @ direction) / W.norm(dim=1).clamp_min(EPS)
    total = acts @ direction  # (words,): the probe projection of the activation itself
    latent_proj = codes * cos  # (words, d_sae): SAEBench's activation x cosine (the projection for unit decoder rows)
    is_main = torch.zeros(W.shape[0], dtype=torch.bool)
    is_main[main] = True
    main_proj = latent_proj[:, is_main].sum(1)
    candidates = latent_proj.masked_fill(is_main | (cos < cfg.fraction_cos), 0).clamp_min(0)
    absorbers = candidates.topk(min(cfg.max_absorbers, W.shape[0]), dim=1).values.sum(1)
    unaccounted = (total - main_proj).clamp_min(0)
    absorbed = torch.minimum(absorbers, unaccounted)
    partial = (absorbed / (absorbed + main_proj).clamp_min(EPS)).clamp(0, 1)
    counts = (main_proj < total) & (absorbers / total.clamp_min(EPS) >= cfg.projection_share) & (total > 0)
    fraction = torch.where(counts, torch.where(main_proj <= 0, torch.ones_like(partial), partial), torch.zeros_like(partial))
    top_value, top_latent = latent_proj.max(1)
    silent = (codes[:, is_main] < EPS).all(1)
    full = silent & (cos[top_latent] >= cfg.full_cos) & (total > 0) & (top_value / total.clamp_min(EPS) >= cfg.projection_share)
    return fraction, full


def absorption_layer(acts: Tensor, data: SpellingSet, sets: dict[str, SAE], cfg: AbsorptionConfig) -> dict:
    """One layer: the first-letter probe's test F1, then per SAE set the absorption figures (module docstring)."""
    letters, test = torch.as_tensor(data.letters), torch.as_tensor(data.test)
    onehot = torch.nn.functional.one_hot(letters, len(LETTERS)).bool()
    x = acts.double()
    probe = fit_logistic(x[~test], onehot[~test], balanced=True)
    scores = probe.scores(x[test])
    letter_f1 = [_f1(scores[:, c] > 0, onehot[test][:, c]) for c in range(len(LETTERS)) if onehot[test][:, c].any()]
    result: dict = {"probe_f1": float(np.mean(letter_f1)), "n_train_words": int((~test).sum()), "n_test_words": int(test.sum())}
    for name, sae in sets.items():
        with torch.no_grad():
            codes = sae.encode(acts.to(sae.W_enc.device)).dense(sae.cfg.d_sae).float().cpu()
        fractions, fulls, splits, main_f1s, letters_used = [], [], [], [], []
        all_scores = probe.scores(x)
        train, held_out = codes[~test], codes[test]  # once: the loop reads a few columns of each
        ranked = torch.topk(class_mean_differences(train, onehot[~test]), cfg.max_k, dim=1).indices
        for c, letter in enumerate(LETTERS):
            is_letter = onehot[:, c]
            scored = test & is_letter & (all_scores[:, c] > 0)  # the probe's true positives among test words
            if int(scored.sum()) < MIN_WORDS or int(is_letter[~test].sum()) < 2:
                continue
            main, f1 = main_latents(train, held_out, is_letter[~test], is_letter[test], ranked[c], cfg)
            direction = (probe.weight[c] / probe.weight[c].norm()).float()
            fraction, full = absorption_of(acts[scored].float(), codes[scored], sae, direction, main, cfg)
            fractions.append(float(fraction.mean()))
            fulls.append(float(full.float().mean()))
            splits.append(len(main) - 1)
            main_f1s.append(f1)
            letters_used.append(letter)
        result[name] = {"mean_absorption_fraction": _mean(fractions), "full_absorption_rate": _mean(fulls),
                        "mean_splits": _mean(splits), "main_f1": _mean(main_f1s), "letters": "".join(letters_used)}
    return result


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def feature_absorption(lm: LoadedModel, saes: dict[int, SAE], *, control: dict[int, SAE] | None = None,
                       controls: dict[str, dict[int, SAE]] | None = None, layers: list[int] | None = None,
                       cfg: AbsorptionConfig | None = None, progress: bool = True) -> dict:
    """Per layer, the first-letter absorption figures of `saes` (and of each control, on the same prompts and probe:
    `control`, or several by name in `controls`)."""
    controls = named_controls(control, controls)
    cfg = cfg or AbsorptionConfig()
    layers = sorted(layers or saes)
    data = spelling_set(lm.tokenizer, cfg)
    acts = word_activations(lm, data, layers, batch_size=cfg.batch_size, progress=progress)
    out = {}
    for n in tqdm(layers, desc="absorption", disable=not progress):
        sets = {"sae": saes[n], **{name: c[n] for name, c in controls.items()}}
        out[str(n)] = absorption_layer(acts[n], data, sets, cfg)
    return {"layers": out, "config": asdict(cfg),
            "definition": "SAEBench first-letter feature absorption (Chanin et al. 2024): mean absorption fraction and "
                          "full-absorption rate over letters, on test words the first-letter probe gets right"}


def format_absorption(result: dict) -> str:
    rows = result["layers"]
    ctl = all("control" in r for r in rows.values())
    head = (f"{'layer':>5} {'probe F1':>8} {'absorb':>7} {'full':>6} {'splits':>6} {'main F1':>7}"
            + (f" {'ctl abs':>7} {'ctl full':>8} {'ctl F1':>7}" if ctl else ""))
    lines = ["feature absorption (first letter; lower is better; main F1 = the letter's main latents as a probe)", head]
    for n, r in rows.items():
        s = r["sae"]
        line = (f"{n:>5} {r['probe_f1']:8.3f} {s['mean_absorption_fraction']:7.3f} {s['full_absorption_rate']:6.3f} "
                f"{s['mean_splits']:6.2f} {s['main_f1']:7.3f}")
        if ctl:
            c = r["control"]
            line += f" {c['mean_absorption_fraction']:7.3f} {c['full_absorption_rate']:8.3f} {c['main_f1']:7.3f}"
        lines.append(line)
    return "\n".join(lines)
