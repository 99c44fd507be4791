"""Before/after figures for a fine-tuned model: the unwanted behaviour, the target features, the LM loss and a
capability check, all on data the fine-tuning never saw.

- behaviour: greedy answers to held-out M-IFEval prompts: loop rate, distinct-2, and the share of the answers' tokens
  on which any target feature fires (the model's own text, read back through the SAE);
- held-out loss: mean CE per response token of held-out prompt/response pairs;
- capability: ARC-Easy accuracy, the choice with the highest mean log-likelihood per token (lm-eval's acc_norm idea,
  per token rather than per byte), on a fixed seeded sample.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from saescope.api.behaviour import answer_and_measure
from saescope.apps.sasft.loss import FeatureSuppression
from saescope.core.data.benchmarks import shared_data_dir
from saescope.core.data.responses import Pair
from saescope.core.data.rows import iter_rows


def _chat(lm) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def _prompt_text(lm, prompt: str) -> str:
    if _chat(lm):
        return lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


@torch.no_grad()
def _continuation_logprobs(lm, context: str, continuation: str) -> tuple[float, int]:
    """(sum of log p(continuation tokens | context), number of tokens)."""
    tok = lm.tokenizer
    ctx = tok(context, add_special_tokens=not _chat(lm))["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        return 0.0, 0
    ids = torch.tensor([ctx + cont], device=lm.device)
    logits = lm.model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1 : -1].float()
    lp = F.log_softmax(logits, -1).gather(-1, ids[0, len(ctx):, None]).sum()
    return float(lp), len(cont)


def response_loss(lm, pairs: Sequence[Pair], *, max_tokens: int = 256) -> float:
    """Mean CE per response token over held-out pairs (responses cut to max_tokens tokens)."""
    total, count = 0.0, 0
    for p in pairs:
        cut = lm.tokenizer.decode(lm.tokenizer(p.response, add_special_tokens=False)["input_ids"][:max_tokens])
        lp, n = _continuation_logprobs(lm, _prompt_text(lm, p.prompt), cut)
        total, count = total - lp, count + n
    return total / max(count, 1)


def arc_easy_accuracy(lm, *, n: int = 200, seed: int = 0, shared_data: str | None = None) -> float:
    path = shared_data_dir(shared_data) / "benchmarks" / "arc_easy.jsonl"
    rows = [row for _, row in iter_rows(path)]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    hits = 0
    for r in rows:
        scores = []
        for choice in r["choices"]:
            lp, k = _continuation_logprobs(lm, r["query"] + "\nAnswer:", " " + choice)
            scores.append(lp / max(k, 1))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == r["gold"])
    return hits / len(rows)


@torch.no_grad()
def feature_fire_rate(lm, suppression: FeatureSuppression, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Share of the answers' tokens (prompt tokens left out) on which any target feature is among the SAE's top-k."""
    fired, total = 0, 0
    for prompt, answer in zip(prompts, answers):
        ctx = lm.tokenizer(_prompt_text(lm, prompt), add_special_tokens=not _chat(lm))["input_ids"]
        ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ans:
            continue
        ids = torch.tensor([ctx + ans], device=lm.device)
        with suppression.watch(lm.model):
            lm.model(input_ids=ids, use_cache=False)
        mask = torch.zeros_like(ids)
        mask[0, len(ctx):] = 1
        suppression.loss(mask)
        fired += round(suppression.stats.fire_rate * len(ans))
        total += len(ans)
    return fired / max(total, 1)


def measure(lm, suppression: FeatureSuppression, prompts: Sequence[str], pairs: Sequence[Pair], *,
            max_new_tokens: int = 128, arc: int = 200, language: str | None = None, shared_data: str | None = None) -> dict:
    """Every figure above for one model (with `language`, also the share of answers in that language, the prompts'
    own); `answers` keeps three of its greedy answers for the reader."""
    was_training = lm.model.training
    lm.model.eval()
    try:
        answers, stats = answer_and_measure(lm, prompts, max_new_tokens=max_new_tokens, language=language)
        return {"prompts": len(prompts), "loop_rate": stats.loop_rate, "distinct_2": stats.distinct_2,
                "language": language, "language_rate": stats.language_rate,
                "mean_units": stats.mean_units, "feature_fire_rate": feature_fire_rate(lm, suppression, prompts, answers),
                "heldout_loss": response_loss(lm, pairs) if pairs else None,
                "arc_easy": arc_easy_accuracy(lm, n=arc, shared_data=shared_data) if arc else None,
                "answers": answers[:3]}
    finally:
        lm.model.train(was_training)
