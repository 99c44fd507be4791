"""The SAE features behind a behaviour, and whether steering them moves it.

`repetition_features` contrasts a token's later repeated occurrences with its first occurrence in real degenerate text
(the report's method); `language_features` ranks by nu = mean activation on one language minus the mean over the
others. `verify_features` steers a feature both ways and measures the behaviour (saescope.api.behaviour), beside the
same feature ids of the control (random directions of the same norm), so a user sees whether the feature does more
than any direction would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.api.behaviour import BehaviourStats, LanguageID, behaviour_stats, ends_in_loop, generate_batch
from saescope.api.steer import steering
from saescope.core.data.responses import responses
from saescope.core.errors import SaescopeError
from saescope.core.sae import SAE


def degenerate_responses(lang: str = "en", *, shared_data: str | None = None) -> list[str]:
    """Real looping answers: every M-IFEval response (all 17 models) in `lang` that ends in a repetition loop, on the
    train side of the prompt split only."""
    out = [r for r in responses(lang, split="train", shared_data=shared_data) if ends_in_loop(r)]
    if not out:
        raise SaescopeError(f"no looping responses in {lang!r} among the M-IFEval answers")
    return out


@dataclass
class RankedFeature:
    feature: int
    nu: float  # the contrast: mean activation on the behaviour's side minus on the other side
    rate_on: float  # share of the behaviour's positions (or texts) where it fires
    rate_off: float

    def to_dict(self) -> dict:
        return asdict(self)


def repeat_pairs(ids: Sequence[int], n: int = 4) -> list[tuple[int, int]]:
    """(first, last) positions of repeated tokens in a text: for each n-gram that occurs again, the position of its last
    token at its first occurrence and at its last occurrence. n-grams (not single tokens) keep out the benign reuse of
    'the' or ',' that every text has; what remains is verbatim repetition."""
    first: dict[tuple[int, ...], int] = {}
    last: dict[tuple[int, ...], int] = {}
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1 : end + 1])
        if gram in first:
            last[gram] = end
        else:
            first[gram] = end
    return [(first[g], last[g]) for g in last]


def _rank(on: Tensor, off: Tensor, fire_on: Tensor, fire_off: Tensor, top: int) -> list[RankedFeature]:
    nu = on - off
    order = torch.argsort(nu, descending=True)[:top]
    return [RankedFeature(int(f), float(nu[f]), float(fire_on[f]), float(fire_off[f])) for f in order]


def repetition_features(scope, layer: int, texts: Sequence[str], *, top: int = 10, n: int = 4,
                        max_length: int = 512) -> tuple[list[RankedFeature], int]:
    """Features ranked by nu = mean activation at a token's last repeated occurrence minus at its first occurrence
    (over every repeated n-gram of every text), and the number of (first, last) pairs that went into it."""
    sae = scope.sae(layer)
    d = sae.cfg.d_sae
    on, off = torch.zeros(d), torch.zeros(d)
    fire_on, fire_off = torch.zeros(d), torch.zeros(d)
    pairs = 0
    for codes in scope.encode(list(texts), layers=[layer], max_length=max_length, progress=True):
        ps = [(a, b) for a, b in repeat_pairs(codes.input_ids.tolist(), n) if a > 0]  # position 0 is the attention sink
        if not ps:
            continue
        dense = codes.layers[layer].dense(d).float().cpu()
        firsts, lasts = dense[[a for a, _ in ps]], dense[[b for _, b in ps]]
        on += lasts.sum(0)
        off += firsts.sum(0)
        fire_on += (lasts > 0).float().sum(0)
        fire_off += (firsts > 0).float().sum(0)
        pairs += len(ps)
    if not pairs:
        raise SaescopeError(f"none of the {len(texts)} texts repeats a {n}-token sequence: give degenerate (looping) text")
    return _rank(on / pairs, off / pairs, fire_on / pairs, fire_off / pairs, top), pairs


def language_features(scope, layer: int, texts_by_language: dict[str, Sequence[str]], language: str, *,
                      top: int = 10, max_length: int = 256) -> list[RankedFeature]:
    """Features ranked by nu = mean activation on `language`'s texts minus the mean over the other languages' (each
    language's mean is over its texts' token-mean activations; the first token is left out)."""
    if language not in texts_by_language:
        raise SaescopeError(f"no texts in {language!r} (have {', '.join(sorted(texts_by_language))})")
    if len(texts_by_language) < 2:
        raise SaescopeError("a language contrast needs texts in at least two languages")
    means, fires = {}, {}
    for lang, texts in texts_by_language.items():
        pooled = scope.pooled(list(texts), layer=layer, pool="mean", skip_first_token=True, max_length=max_length,
                              progress=False).float().cpu()
        means[lang], fires[lang] = pooled.mean(0), (pooled > 0).float().mean(0)
    others = [lang for lang in texts_by_language if lang != language]
    off = torch.stack([means[lang] for lang in others]).mean(0)
    fire_off = torch.stack([fires[lang] for lang in others]).mean(0)
    return _rank(means[language], off, fires[language], fire_off, top)


# ---- does steering the feature move the behaviour? -------------------------------------------------------------


@dataclass
class SteerCheck:
    strength: float
    direction: str  # "none", "feature <id>" or "control <id>"
    stats: BehaviourStats

    def to_dict(self) -> dict:
        return {"strength": self.strength, "direction": self.direction, **self.stats.to_dict()}


def verify_features(scope, layer: int, features: Sequence[int], prompts: Sequence[str], *, strengths: Sequence[float],
                    control: SAE, max_new_tokens: int = 96, language: str | None = None,
                    progress: bool = True) -> list[SteerCheck]:
    """Generate on `prompts` unsteered, then with each feature's decoder direction added at each strength (both signs
    measure both ways), and with the `control` SAE's decoder rows of the same feature ids (random unit directions,
    saescope.api.controls) at the same strengths: loop rate, distinct-2 and, with `language`, its share. The control's
    directions are the chance level any feature has to beat."""
    directions = {f"feature {f}": scope.direction(layer=layer, feature=f) for f in features}
    directions |= {f"control {f}": control.W_dec[f].detach() for f in features}
    lid = LanguageID.fit_mgsm() if language else None
    chat = bool(getattr(scope.lm.tokenizer, "chat_template", None))

    def run(vector: Tensor | None) -> BehaviourStats:
        if vector is None:
            texts = generate_batch(scope.lm, prompts, max_new_tokens=max_new_tokens, chat=chat)
        else:
            with steering(scope.lm.model, layer=layer, vector=vector.to(scope.lm.device)):
                texts = generate_batch(scope.lm, prompts, max_new_tokens=max_new_tokens, chat=chat)
        return behaviour_stats(texts, language=language, language_id=lid)

    runs = [("none", 0.0, None)] + [(name, float(s), s * d) for name, d in directions.items() for s in strengths]
    return [SteerCheck(s, name, run(vector)) for name, s, vector in tqdm(runs, desc="steering check", disable=not progress)]
