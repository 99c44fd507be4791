"""Bad input gets one clear line on stderr and exit status 2, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from saescope.core.io import export_saes
from saescope.core.sae import SAEConfig, TopKSAE


@pytest.mark.parametrize("extra,fragment", [
    (["--layers", "7"], "layer 7 is out of range"),
    (["--preset", "16x-k50", "--k", "100000"], "larger than d_sae"),
    (["--text-column", "body"], "no column 'body'"),
])
def test_train_bad_input(tiny_qwen3, text_file, tmp_path, extra, fragment):
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(tmp_path / "r"), *extra)
    assert_one_line_error(code, err, fragment)


def test_train_bad_model_and_data(tiny_qwen3, tmp_path):
    code, _, err = run_cli("train", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "model not found")
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "config.json").write_text('{"model_type": "qwen3", "hidden_size": "wide"}')
    code, _, err = run_cli("train", "--model", str(tmp_path / "badmodel"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "cannot load model")
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "holds no text")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "not UTF-8")


def test_cli_train_eval_export(tiny_qwen3, text_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(out),
                             "--preset", "4x-k32", "--ctx-len", "32", "--batch-size", "4", "--max-tokens", "1024",
                             "--eval-tokens", "256")
    assert code == 0, err
    assert "CE rec" in stdout and (out / "eval.json").exists()
    body = json.loads((out / "eval.json").read_text())
    rows = body["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert (body["n_tokens"], body["ctx_len"], body["outlier_factor"]) == (256, 32, 5.0)
    table = {int(line.split()[0]): line.split() for line in stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])}
    for r in rows:
        assert r["fvu"] < 1.0, r  # trained: better than reconstructing every token as the mean
        assert 0 < r["l0"] <= 32, r  # k = 32 latents at most per token
        assert (r["dead_frac"] * 256).is_integer() and (r["dense_frac"] * 256).is_integer(), r  # d_sae = 4 x 64
        assert r["ce_clean"] == rows[0]["ce_clean"]  # the same held-out tokens for every layer
        rec = (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"])
        assert r["ce_recovered"] == pytest.approx(rec, rel=1e-9), r
        # the printed table shows the figures written to eval.json
        assert table[r["layer"]][1] == f"{r['fvu']:.4f}" and table[r["layer"]][2] == f"{r['l0']:.1f}", (table, r)
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(out))
    assert_one_line_error(code, err, "already holds a run")
    code, stdout, err = run_cli("export", "--sae", str(out), "--to", "saelens", "--out", str(tmp_path / "sl"))
    assert code == 0 and (tmp_path / "sl" / "layer1" / "cfg.json").exists(), err


def test_eval_refuses_mismatched_sae(tiny_qwen3, tmp_path):
    sae = TopKSAE(SAEConfig(65, 130, 4))
    sae.init_tied(torch.Generator().manual_seed(0))
    export_saes({0: sae}, tmp_path / "sae", "saescope")
    code, _, err = run_cli("eval", "--sae", str(tmp_path / "sae"), "--model", str(tiny_qwen3))
    assert_one_line_error(code, err, "d_model 65")
    (tmp_path / "sae" / "layer0.safetensors").write_bytes(b"12345")
    code, _, err = run_cli("eval", "--sae", str(tmp_path / "sae"), "--model", str(tiny_qwen3))
    assert_one_line_error(code, err, "corrupt or truncated")


def test_torchrun_without_distributed_mode_is_refused(tiny_qwen3, text_file, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "saescope", "train", "--model", str(tiny_qwen3), "--data", str(text_file),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, "--distributed dp")


def test_the_command_line_starts_without_the_trainer_stack():
    """Building the parser (what every command does first) must not import transformers' Trainer or peft: they cost
    ~3 s per command, which SASFT's and RL's flags once made every `saescope` call pay."""
    probe = ("import sys; from saescope.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('peft', 'trl', 'transformers.trainer_callback', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("argv, tuned", [(["train", "--layers", "3"], False), (["--debug", "sweep"], False),
                                         (["quality", "--sae", "x"], True), (["eval"], True), ([], True)])
def test_the_console_script_keeps_freed_memory_for_reading_commands_only(monkeypatch, argv, tuned):
    import saescope.cli as cli
    import saescope.core.system as system

    calls = []
    monkeypatch.setattr(system, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    monkeypatch.setattr(sys, "argv", ["saescope", *argv])
    assert cli.entry() == 0
    assert bool(calls) == tuned
