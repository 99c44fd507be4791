"""Behaviours a post-training team wants less of, measured on generated text: what discovery, SASFT and RL all measure.

Metrics (model-free, on text): `ends_in_loop` (the answer ends in a verbatim repetition loop), `distinct_n`
(unique n-grams / n-grams), and `LanguageID` (a character-trigram classifier fitted on MGSM's eleven parallel
languages); `generate_batch` and `answer_and_measure` produce the texts they are read on.

Units: texts are split into words and punctuation marks (`units`), so the metrics do not depend on a tokenizer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saescope.core.data.benchmarks import mgsm_questions
from saescope.core.errors import InputError, ParamError, SaescopeError
from saescope.core.files import read_json
from saescope.core.schema import Field, check_record, escape

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


def mgsm_accuracy(lid: LanguageID, shared_data: str | None = None, problems: range = range(200, 250)) -> float:
    qs = mgsm_questions(shared_data)
    hits = [lid.identify(q[i]) == lang for lang, q in qs.items() for i in problems]
    return sum(hits) / len(hits)


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


# A features file as `saescope discover` writes it, read back strictly.
FEATURES_RECORD = {"behaviour": Field(str), "layer": Field(int, min=0), "selected": Field(list), "sae": Field(str),
                   "model": Field(str), "ranked": Field(list), "steering_check": Field(list)}


def feature_spec(spec: str | list[int], layer: int | None) -> tuple[list[int], int | None]:
    """Feature ids ('3,7', [3, 7]) at `layer`, or the selected features of a features file written by `saescope
    discover` with its layer (a given `layer` must agree with the file's)."""
    if isinstance(spec, list):
        return [int(f) for f in spec], layer
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ParamError(f"{{}} {escape(spec)}: no such file", "features")
        doc = read_json(path)
        if not isinstance(doc, dict) or "selected" not in doc or "layer" not in doc:
            raise InputError(f"{path}: not a features file from `saescope discover` (no 'selected' / 'layer')")
        check_record(doc, FEATURES_RECORD, str(path))
        if not doc["selected"] or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in doc["selected"]):
            raise InputError(f"{path}: field 'selected' must list feature ids (integers >= 0)")
        if layer is not None and layer != doc["layer"]:
            raise ParamError(f"{{}} {layer}, but {escape(str(path))} holds features of layer {doc['layer']}", "layer")
        return [int(f) for f in doc["selected"]], int(doc["layer"])
    try:
        return [int(x) for x in spec.split(",")], layer
    except ValueError:
        raise ParamError(f"{{}} must be ids such as 3,7 or a features .json file, got {escape(repr(spec))}", "features") from None


def check_feature_ids(sae, features: Sequence[int], layer: int) -> None:
    """Feature ids a features file or a flag names, against the SAE they are for: refused before any model loads."""
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise ParamError(f"{{}} {bad[0]} is out of range: the layer {layer} SAE has features 0..{sae.cfg.d_sae - 1}", "feature")
