"""Behaviours a post-training team wants less of, measured on generated text, and the SAE features behind them.

Metrics (model-free, on text): `ends_in_loop` (the answer ends in a verbatim repetition loop), `distinct_n`
(unique n-grams / n-grams), and `LanguageID` (a character-trigram classifier fitted on MGSM's eleven parallel
languages). Features: `repetition_features` contrasts a token's later repeated occurrences with its first occurrence
in real degenerate text (the report's method); `language_features` ranks by nu = mean activation on one language
minus the mean over the others. `verify_features` steers a feature both ways and measures the behaviour, beside random
directions of the same norm from the random control (saescope.core.sae.random_like), so a user sees whether the feature
does more than any direction would.

Units: texts are split into words and punctuation marks (`units`), so the metrics do not depend on a tokenizer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from saescope.core.errors import SaescopeError

_UNIT = re.compile(r"\w+|[^\w\s]")


def units(text: str) -> list[str]:
    return _UNIT.findall(text.lower())


def ends_in_loop(text: str, *, max_period: int = 40, min_span: int = 16) -> bool:
    """True when the text ends in a loop: for some period p <= max_period, its last max(2p, min_span) units are p-periodic
    (u[i] == u[i - p]), i.e. at least two full copies of a p-unit block and at least min_span units of repetition.
    A block cut off by the length limit still counts (periodicity is a shift test), so truncated loops are caught."""
    u = units(text)
    for p in range(1, max_period + 1):
        span = max(2 * p, min_span)
        if span > len(u):
            break
        tail = u[-span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False


def distinct_n(text: str, n: int = 2) -> float:
    """Unique n-grams / n-grams of the text's units (1.0 for a text shorter than n: nothing repeats)."""
    u = units(text)
    grams = [tuple(u[i : i + n]) for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@dataclass
class BehaviourStats:
    n: int
    loop_rate: float
    distinct_2: float
    mean_units: float
    language_rate: float | None = None  # share of texts identified as `language`
    language: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def behaviour_stats(texts: Sequence[str], *, language: str | None = None, language_id: LanguageID | None = None) -> BehaviourStats:
    """Loop rate, mean distinct-2 and length of a set of generated texts; with `language`, the share identified as it."""
    if not texts:
        raise SaescopeError("no generated texts to measure")
    rate = None
    if language is not None:
        lid = language_id or LanguageID.fit_mgsm()
        rate = sum(lid.identify(t) == language for t in texts) / len(texts)
    return BehaviourStats(n=len(texts), loop_rate=sum(map(ends_in_loop, texts)) / len(texts),
                          distinct_2=sum(distinct_n(t, 2) for t in texts) / len(texts),
                          mean_units=sum(len(units(t)) for t in texts) / len(texts), language_rate=rate, language=language)


@dataclass
class LanguageID:
    """Naive Bayes on character trigrams (add-one smoothing): small, dependency-free and auditable. `fit_mgsm` fits it on
    MGSM's problems 0..199 in its 11 languages; problems 200..249 are its held-out check (`mgsm_accuracy`)."""

    log_prob: dict[str, dict[str, float]] = field(default_factory=dict)
    unseen: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _grams(text: str) -> list[str]:
        t = f"  {re.sub(r'[0-9]+', '0', text.lower())}  "
        return [t[i : i + 3] for i in range(len(t) - 2)]

    @classmethod
    def fit(cls, texts_by_language: dict[str, Sequence[str]]) -> LanguageID:
        if len(texts_by_language) < 2:
            raise SaescopeError("a language identifier needs texts in at least two languages")
        lid = cls()
        for lang, texts in texts_by_language.items():
            counts = Counter(g for t in texts for g in cls._grams(t))
            total, vocab = sum(counts.values()), len(counts) + 1
            lid.log_prob[lang] = {g: math.log((c + 1) / (total + vocab)) for g, c in counts.items()}
            lid.unseen[lang] = math.log(1 / (total + vocab))
        return lid

    @classmethod
    def fit_mgsm(cls, shared_data: str | None = None, *, problems: range = range(200)) -> LanguageID:
        return cls.fit({lang: [qs[i] for i in problems] for lang, qs in mgsm_questions(shared_data).items()})

    def identify(self, text: str) -> str | None:
        """The most likely language, or None for a text without letters (digits and punctuation say nothing)."""
        grams = [g for g in self._grams(text) if any(c.isalpha() for c in g)]
        if not grams:
            return None
        return max(self.log_prob, key=lambda lang: sum(self.log_prob[lang].get(g, self.unseen[lang]) for g in grams))


def mgsm_questions(shared_data: str | None = None) -> dict[str, list[str]]:
    """MGSM's 250 problems per language ({'en': [...], 'fr': [...], ...}), read from the shared data."""
    from saescope.core.data.benchmarks import shared_data_dir
    from saescope.core.data.rows import iter_rows

    folder = shared_data_dir(shared_data) / "multilingual" / "mgsm"
    files = sorted(folder.glob("mgsm_*.tsv"))
    if not files:
        raise SaescopeError(f"no MGSM files in {folder}")
    return {f.stem.removeprefix("mgsm_"): [row["question"] for _, row in iter_rows(f, columns=("question", "answer"))]
            for f in files}


def mgsm_accuracy(lid: LanguageID, shared_data: str | None = None, problems: range = range(200, 250)) -> float:
    qs = mgsm_questions(shared_data)
    hits = [lid.identify(q[i]) == lang for lang, q in qs.items() for i in problems]
    return sum(hits) / len(hits)


# ---- features behind a behaviour -------------------------------------------------------------------------------

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

def generate_batch(lm, prompts: Sequence[str], *, max_new_tokens: int = 96, chat: bool = True, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Continuations of many prompts, batched with left padding (greedy unless temperature > 0). Steer by calling inside
    `saescope.api.steer.steering`."""
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    if chat and not getattr(tok, "chat_template", None):
        raise SaescopeError(f"{lm.name}'s tokenizer has no chat template; generate without chat")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
            enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=not chat).to(lm.device)
            sample = temperature > 0
            with torch.no_grad():
                ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                        temperature=temperature if sample else None, top_p=None, top_k=None,
                                        pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def answer_and_measure(lm, prompts: Sequence[str], *, max_new_tokens: int,
                       language: str | None = None) -> tuple[list[str], BehaviourStats]:
    """Greedy answers to `prompts` (through the chat template when the tokenizer has one), in eval mode whatever mode
    the model was in, and their behaviour figures: what SASFT and RL measure before and after training."""
    was_training = lm.model.training
    lm.model.eval()
    try:
        answers = generate_batch(lm, prompts, max_new_tokens=max_new_tokens,
                                 chat=bool(getattr(lm.tokenizer, "chat_template", None)))
    finally:
        lm.model.train(was_training)
    return answers, behaviour_stats(answers, language=language)


@dataclass
class SteerCheck:
    strength: float
    direction: str  # "none", "feature <id>" or "random-<seed>"
    stats: BehaviourStats

    def to_dict(self) -> dict:
        return {"strength": self.strength, "direction": self.direction, **self.stats.to_dict()}


def verify_features(scope, layer: int, features: Sequence[int], prompts: Sequence[str], *, strengths: Sequence[float],
                    n_random: int = 2, max_new_tokens: int = 96, language: str | None = None,
                    progress: Callable | None = None) -> list[SteerCheck]:
    """Generate on `prompts` unsteered, then with each feature's decoder direction added at each strength (both signs
    measure both ways), and with `n_random` random unit directions (rows of the random control,
    saescope.core.sae.random_like, seeds 0..n_random-1) at the same strengths: loop rate, distinct-2 and, with `language`,
    its share. The random directions are the chance level any feature has to beat."""
    from saescope.core.sae import random_like
    from saescope.api.steer import steering

    sae = scope.sae(layer)
    directions = {f"feature {f}": scope.direction(layer=layer, feature=f) for f in features}
    for seed in range(n_random):
        directions[f"random-{seed}"] = random_like(sae, seed=seed).W_dec[0].detach()
    lid = LanguageID.fit_mgsm() if language else None
    chat = bool(getattr(scope.lm.tokenizer, "chat_template", None))

    def run(vector: Tensor | None) -> BehaviourStats:
        if vector is None:
            texts = generate_batch(scope.lm, prompts, max_new_tokens=max_new_tokens, chat=chat)
        else:
            with steering(scope.lm.model, layer=layer, vector=vector.to(scope.lm.device)):
                texts = generate_batch(scope.lm, prompts, max_new_tokens=max_new_tokens, chat=chat)
        return behaviour_stats(texts, language=language, language_id=lid)

    checks = [SteerCheck(0.0, "none", run(None))]
    if progress:
        progress(checks[-1])
    for name, d in directions.items():
        for s in strengths:
            checks.append(SteerCheck(float(s), name, run(s * d)))
            if progress:
                progress(checks[-1])
    return checks
