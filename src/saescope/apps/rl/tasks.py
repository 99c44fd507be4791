"""Verifiable tasks for RL: arithmetic word problems from the shared data, and their rewards.

    svamp          SVAMP's 1,000 problems (Body + Question, numeric Answer)
    gsm8k          GSM8K test (question, the number after '####')
    mgsm_LANG      MGSM's 250 problems in LANG (en fr es de ja ...)
    a file         csv/jsonl/parquet with a prompt and an answer column

Each set is split 80/20 by a seeded hash of the prompt (`split="train"` for training, `"test"` for the held-out
measurement), so no problem is trained on and measured on. Rewards (TRL's signature: prompts, completions, **columns):
`exact_match_reward` (1 when the completion's final number equals the answer), `format_reward` (1 when it ends its
answer with 'The answer is N', the format the prompt asks for, whatever N).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from saescope.core.data.labelled import in_test_split
from saescope.core.data.rows import iter_rows
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import escape

INSTRUCTION = "Solve the problem. End with 'The answer is N.' where N is the number."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"answer is:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class Problem:
    prompt: str
    answer: float


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after the last 'answer is', else the last number in the text."""
    hits = _FINAL.findall(text)
    if hits:
        return _number(hits[-1])
    numbers = _NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def message_text(x) -> str:
    """The text of a prompt or completion as TRL hands it over: a string, or chat messages (their contents, one per
    line)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        return "\n".join(m["content"] if isinstance(m.get("content"), str) else str(m.get("content", "")) for m in x)
    return str(x)


def exact_match_reward(prompts, completions, answer, **_) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        got = final_number(message_text(c))
        out.append(1.0 if got is not None and abs(got - float(a)) < 1e-6 else 0.0)
    return out


def format_reward(prompts, completions, **_) -> list[float]:
    return [1.0 if _FINAL.search(message_text(c)) else 0.0 for c in completions]


REWARDS = {"exact-match": exact_match_reward, "format": format_reward}


def _rows(spec: str, shared_data: str | None) -> list[tuple[str, str, object]]:
    """(where, question, answer) of a built-in set or a file."""
    from saescope.core.data.benchmarks import shared_data_dir

    if spec == "svamp":
        path = shared_data_dir(shared_data) / "benchmarks" / "svamp.json"
        return [(w, f"{r['Body'].strip()} {r['Question'].strip()}", r["Answer"]) for w, r in iter_rows(path)]
    if spec == "gsm8k":
        path = shared_data_dir(shared_data) / "benchmarks" / "gsm8k_test.jsonl"
        return [(w, r["question"], r["answer"].split("####")[-1].strip()) for w, r in iter_rows(path)]
    if spec.startswith("mgsm_"):
        path = shared_data_dir(shared_data) / "multilingual" / "mgsm" / f"{spec}.tsv"
        if not path.exists():
            raise SaescopeError(f"no MGSM set {spec!r} ({path} is missing)")
        return [(w, r["question"], r["answer"]) for w, r in iter_rows(path, columns=("question", "answer"))]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ParamError(f"{{}} {escape(spec)}: not a built-in set (svamp, gsm8k, mgsm_LANG) and no such file", "data")
    rows = []
    for where, r in iter_rows(path, require="prompt"):
        if not isinstance(r, dict) or "prompt" not in r or "answer" not in r:
            cols = ", ".join(map(str, r)) if isinstance(r, dict) else type(r).__name__
            raise SaescopeError(f"{where}: a problem needs 'prompt' and 'answer' columns (found: {cols})")
        rows.append((where, r["prompt"], r["answer"]))
    return rows


def load_problems(spec: str, *, split: str = "train", limit: int | None = None, shared_data: str | None = None) -> list[Problem]:
    if split not in ("train", "test", "all"):
        raise SaescopeError(f"split must be train, test or all, got {split!r}")
    out = []
    for where, question, answer in _rows(spec, shared_data):
        value = _number(str(answer))
        if not isinstance(question, str) or not question.strip():
            raise SaescopeError(f"{where}: the prompt is empty or not text")
        if value is None:
            raise SaescopeError(f"{where}: the answer {answer!r} is not a number")
        side = "test" if in_test_split(question, 0, 0.2) else "train"
        if split != "all" and side != split:
            continue
        out.append(Problem(f"{question.strip()}\n{INSTRUCTION}", value))
        if limit and len(out) >= limit:
            break
    if not out:
        raise SaescopeError(f"{spec}: no problems on the {split} side")
    return out
