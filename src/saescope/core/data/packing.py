"""Pack texts into fixed-length token chunks, shuffled in a seeded buffer, reproducible to the batch.

A run's data position is the number of batches consumed: re-creating the stream with the same
arguments and skipping that many batches gives exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from saescope.core.errors import SaescopeError
from saescope.core.schema import check_number


def token_chunks(texts: Iterable[str], tokenizer, ctx_len: int, *, tokenize_batch: int = 64) -> Iterator[list[int]]:
    """Concatenate the texts' tokens, separated by EOS, and cut them into chunks of ctx_len tokens."""
    check_number(ctx_len, "context length", kind=int, min=2)
    check_number(tokenize_batch, "tokenize_batch", kind=int, min=1)
    sep = tokenizer.eos_token_id
    # Models whose tokenizer prepends BOS (Gemma, Llama-2...) expect it at position 0: every chunk then
    # starts with BOS followed by ctx_len - 1 text tokens. Others (SmolLM2, Qwen) get plain chunks.
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []
    body = ctx_len - len(prefix)
    buffer: list[int] = []
    pending: list[str] = []
    n_texts = 0

    def flush() -> Iterator[list[int]]:
        nonlocal buffer
        if not pending:
            return
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            if sep is not None:
                buffer.append(sep)
        while len(buffer) >= body:
            yield prefix + buffer[:body]
            buffer = buffer[body:]
        pending.clear()

    for text in texts:
        if not isinstance(text, str):
            raise SaescopeError(f"expected text, got {type(text).__name__}")
        n_texts += 1
        pending.append(text)
        if len(pending) >= tokenize_batch:
            yield from flush()
    yield from flush()
    if n_texts == 0:
        raise SaescopeError("the dataset holds no text")


def batches(
    texts: Iterable[str],
    tokenizer,
    *,
    ctx_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle_buffer: int = 512,
    skip: int = 0,
) -> Iterator[Tensor]:
    """(batch_size, ctx_len) LongTensors; the first `skip` batches are consumed without yielding."""
    # A batch size of 0 would never fill a batch: the stream would end at once, silently empty.
    check_number(batch_size, "batch size", kind=int, min=1)
    check_number(shuffle_buffer, "shuffle buffer", kind=int, min=1)
    check_number(skip, "batches to skip", kind=int, min=0)
    rng = random.Random(seed)
    pool: list[list[int]] = []
    batch: list[list[int]] = []
    produced = 0

    def emit(chunk: list[int]) -> Iterator[Tensor]:
        nonlocal produced
        batch.append(chunk)
        if len(batch) == batch_size:
            if produced >= skip:
                yield torch.tensor(batch, dtype=torch.long)
            produced += 1
            batch.clear()

    for chunk in token_chunks(texts, tokenizer, ctx_len):
        pool.append(chunk)
        if len(pool) >= shuffle_buffer:
            yield from emit(pool.pop(rng.randrange(len(pool))))
    rng.shuffle(pool)
    for chunk in pool:
        yield from emit(chunk)
