"""Two CPU processes on gloo: data parallel equals one process with the same global batch, and layer
sharding gives each layer the SAE it gets alone."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saescope.core.io import load_saes
from saescope.core.train import TrainConfig, Trainer


def _cfg(model, data, out, batch_size, steps) -> TrainConfig:
    return TrainConfig(model=str(model), data=str(data), out=str(out), preset=None, expansion=4, k=8, ctx_len=32,
                       batch_size=batch_size, max_tokens=32 * 4 * steps, checkpoint_every=3, log_every=1, dead_tokens=256,
                       activation_buffer=0)  # one process shuffling 4 sequences is not two shuffling 2 each


def _worker(rank: int, world: int, port: int, model, data, out, batch_size: int, steps: int, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    Trainer(_cfg(model, data, out, batch_size, steps), distributed=mode).fit()
    dist.destroy_process_group()


def _run(world, mode, model, data, out, batch_size, steps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, model, data, out, batch_size, steps, mode), nprocs=world, start_method="spawn")


# dp: 2 steps, because over more steps Adam and top-k ties amplify float summation-order noise
# (1e-7 after one step, 1e-3 after six) although the maths is the same.
@pytest.mark.parametrize("mode,steps", [("dp", 2), ("layers", 6)])
def test_two_processes_match_one(mode, steps, tiny_qwen3, text_file, tmp_path):
    Trainer(_cfg(tiny_qwen3, text_file, tmp_path / "single", 4, steps)).fit()
    _run(2, mode, tiny_qwen3, text_file, tmp_path / "multi", 2 if mode == "dp" else 4, steps)
    single, multi = load_saes(tmp_path / "single"), load_saes(tmp_path / "multi")
    assert sorted(multi) == sorted(single) == [0, 1, 2]
    for n in single:
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            a, b = getattr(single[n], p), getattr(multi[n], p)
            if mode == "layers":
                assert torch.equal(a, b), (n, p)
            else:  # same maths, different float summation order
                assert torch.allclose(a, b, atol=1e-5), (n, p, (a - b).abs().max())


def test_dp_ends_together_when_the_data_runs_out_on_an_odd_batch(tiny_qwen3, real_texts, tmp_path):
    """Two dp ranks take alternate batches; with an odd number of batches the last one is rank 0's alone. Each
    step's reductions need both ranks, so both must stop at the same step (before the fix rank 0 trained one step
    more, its reductions without a partner: a wait, or on gloo "Connection closed by peer" once rank 1 had exited)."""
    import json
    import time

    from transformers import AutoTokenizer

    from saescope.core.data import iter_texts
    from saescope.core.data.packing import batches

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    data = tmp_path / "odd.jsonl"
    for n_texts in range(4, len(real_texts)):  # the shortest prefix of the texts that packs into an odd count >= 5
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in real_texts[:n_texts]))
        n_batches = sum(1 for _ in batches(iter_texts(str(data)), tok, ctx_len=32, batch_size=2, seed=0))
        if n_batches % 2 == 1 and n_batches >= 5:
            break
    else:
        pytest.skip("no prefix of the test texts packs into an odd number of batches")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dp"
    steps_asked = n_batches * 4  # more than the data holds
    ctx = mp.start_processes(_worker, args=(2, port, tiny_qwen3, data, out, 2, steps_asked, "dp"), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the dp ranks did not finish within 120 s on {n_batches} batches (a rank waits on the other)")
    summary = json.loads((out / "train_summary.json").read_text()) if (out / "train_summary.json").exists() else None
    assert summary is not None and summary["steps"] == n_batches // 2  # the rank with fewer batches sets the end
