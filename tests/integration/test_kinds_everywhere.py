"""Every application takes SAEs of any kind without change: a JumpReLU run (a threshold per latent, a varying L0) and a
BatchTopK run through the commands that read codes (control, eval, feature store, inspect, contrast, steer, export,
report), in process through the real command line."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from saescope import cli
from saescope.core.io import load_saes, save_native
from saescope.core.sae import SAEConfig, make_sae


def _cli(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    assert code == 0, err.getvalue()
    return out.getvalue()


def _saes(kind: str, model: Path, out: Path) -> Path:
    """Three layers' SAEs of `kind` with learned-looking thresholds (random weights: the tiny model is random too)."""
    for n in (0, 1, 2):
        sae = make_sae(SAEConfig(64, 128, 6, kind=kind))
        sae.init_tied(torch.Generator().manual_seed(n))
        with torch.no_grad():
            if kind == "jumprelu":
                sae.log_threshold.copy_((0.05 + 0.1 * torch.rand(128, generator=torch.Generator().manual_seed(n))).log())
            else:
                sae.threshold.fill_(0.08)
        sae.meta = {"model": str(model)}
        save_native(sae, out, n)
    return out


@pytest.mark.parametrize("kind", ["jumprelu", "batchtopk"])
def test_the_applications_read_any_kind(kind, tiny_qwen3, corpus_file, tmp_path):
    run = _saes(kind, tiny_qwen3, tmp_path / "run")
    _cli("control", "random", "--like", str(run), "--out", str(run / "control"))
    control = load_saes(run / "control")
    assert {s.cfg.kind for s in control.values()} == {kind}
    text = _cli("eval", "--sae", str(run), "--control", str(run / "control"), "--n-tokens", "256", "--ctx-len", "32",
                "--data", str(corpus_file))
    body = json.loads((run / "eval.json").read_text())
    assert all(r["l0_std"] > 0 for r in body["layers"]) and "L0 sd" in text  # a varying L0, reported with its spread
    assert all(r["l0"] == pytest.approx(6) for r in body["control"])  # the control keeps k per token
    _cli("features", "build", "--sae", str(run), "--data", str(corpus_file), "--max-tokens", "1024", "--ctx-len", "32",
         "--batch-size", "4")
    _cli("inspect", "--sae", str(run), "--texts", "Natalia sold clips to 48 of her friends", "--top", "3")
    rows = json.loads((run / "inspect" / "inspect.json").read_text())["texts"][0]["layers"]["1"]
    assert rows and all(r["contexts"] for r in rows)
    _cli("inspect", "--sae", str(run), "--texts", "mgsm_fr", "--baseline", "mgsm_en", "--limit", "10", "--layers", "2",
         "--control", str(run / "control"), "--out", str(tmp_path / "contrast.json"))
    assert set(json.loads((tmp_path / "contrast.json").read_text())["control"]["best_rate_diff"]) == {"2"}
    steered = _cli("steer", "--sae", str(run), "--layer", "1", "--feature", "2", "--strength", "200", "--prompt", "Natalia",
                   "--max-new-tokens", "4")
    assert steered.strip()
    _cli("export", "--sae", str(run), "--to", "saelens", "--out", str(tmp_path / "sl"))
    back = load_saes(tmp_path / "sl")
    x = torch.randn(16, 64)
    for n, sae in load_saes(run).items():
        assert torch.allclose(back[n].reconstruct(x), sae.reconstruct(x), atol=1e-5)
    _cli("report", "--sae", str(run))
    assert (run / "report.html").stat().st_size > 1000
