"""A run folder owns itself, results are never silently replaced, and anything unforeseen is one line (issue 19)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli, save_saes
from saescope import cli
from saescope.api.evaluate import LayerEval, write_results
from saescope.cli import train as cli_train
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir, export_saes, load_saes
from saescope.core.sae import SAEConfig, TopKSAE
from saescope.core.train import TrainConfig


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


TRAIN = ["--preset", "4x-k32", "--ctx-len", "32", "--batch-size", "4", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def trained_run(tiny_qwen3, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "orig"
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(out), *TRAIN,
                           "--max-tokens", str(32 * 4 * 6))
    assert code == 0, err
    return out


def test_resume_of_a_copied_run_never_touches_the_original(trained_run, tmp_path):
    original = tmp_path / "orig"
    shutil.copytree(trained_run, original)  # train.json inside names trained_run's folder: the folder it was made in
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (original / "train.json").write_text(json.dumps({**json.loads((original / "train.json").read_text()), "out": str(original)}))
    (copy / "train.json").write_text((original / "train.json").read_text())
    before = tree_hashes(original)
    code, out, err = run_cli("train", "--out", str(copy), "--resume", "--max-tokens", str(32 * 4 * 10))
    assert code == 0, err
    assert "names out=" in err and "resuming here" in err
    assert tree_hashes(original) == before, "resuming the copy changed the original run folder"
    assert (copy / "latest").read_text().strip() == "checkpoints/step-00000010"
    assert json.loads((copy / "train_summary.json").read_text())["tokens"] == 32 * 4 * 10
    assert json.loads((copy / "train.json").read_text())["out"] == str(copy)


def test_resume_keeps_the_runs_settings(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--k", "8")
    assert_one_line_error(code, err, "--k 8 differs from the run's expansion 4, k 32")
    code, _, err = run_cli("train", "--out", str(tmp_path / "nothing"), "--resume")
    assert_one_line_error(code, err, "holds no run")
    (tmp_path / "early").mkdir()
    shutil.copy(run / "train.json", tmp_path / "early" / "train.json")
    code, _, err = run_cli("train", "--out", str(tmp_path / "early"), "--resume")
    assert_one_line_error(code, err, "holds train.json but no `latest`")
    code, _, err = run_cli("train", "--out", str(tmp_path / "early"))  # nor is it started afresh over train.json
    assert_one_line_error(code, err, "already holds a run")
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--max-tok", "99999")  # abbreviations are not flags
    assert_one_line_error(code, err, "unrecognized arguments: --max-tok")
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--seed", "5")
    assert_one_line_error(code, err, "--seed 5 differs from the run's 0")
    assert tree_hashes(run) == before
    # train.json records what `auto` resolved to: the same command line with --resume goes on in that dtype
    assert json.loads((run / "train.json").read_text())["model_dtype"] == "fp32"
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--model-dtype", "auto", "--max-tokens", str(32 * 4 * 8))
    assert code == 0, err
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--model-dtype", "bf16")
    assert_one_line_error(code, err, "--model-dtype bf16 differs from the run's fp32")


@pytest.mark.parametrize("edit,fragment", [
    (lambda cfg: [cfg], "expected a JSON object"),
    (lambda cfg: {**cfg, "k": "abc"}, "field 'k' must be an integer, got 'abc'"),
    (lambda cfg: {**cfg, "max_tokens": None}, "field 'max_tokens' is null"),
    (lambda cfg: {**cfg, "batch_size": -3}, "batch_size must be >= 1"),
    (lambda cfg: {**cfg, "layers": "3-1"}, "bad layer range"),
])
def test_ill_typed_train_json_is_refused_naming_the_field(trained_run, tmp_path, edit, fragment):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "train.json").write_text(json.dumps(edit(json.loads((run / "train.json").read_text()))))
    before = tree_hashes(run)
    with pytest.raises(SaescopeError, match="train.json") as exc:
        TrainConfig.resumed(run)
    assert fragment in str(exc.value)
    assert tree_hashes(run) == before


def test_state_file_with_missing_keys_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state_path = RunDir(run).latest() / "state-rank0.pt"
    state = torch.load(state_path, weights_only=True)
    del state["layers"][1]["medians"]
    torch.save(state, state_path)
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--max-tokens", str(32 * 4 * 10))
    assert_one_line_error(code, err, "layer 1: field 'medians' is missing")
    assert tree_hashes(run) == before


@pytest.mark.parametrize("edit,fragment", [
    (lambda s: s.update(step=10**12), "but the checkpoint is step-00000006"),
    (lambda s: s.update(tokens=10**15), "does not match the run's 128 tokens per step"),
    (lambda s: s.update(batches_done=10**9), "batches_done 1000000000 does not fit step 6"),
    (lambda s: s["layers"][0].update(medians=torch.full_like(s["layers"][0]["medians"], float("nan"))), "finite non-negative"),
    (lambda s: s["layers"][2].update(n_medians=10**6), "n_medians 1000000"),
    (lambda s: s["layers"][1].update(since_fired=s["layers"][1]["since_fired"].float()), "since_fired"),
])
def test_state_values_no_run_produces_are_refused(trained_run, tmp_path, edit, fragment):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state_path = RunDir(run).latest() / "state-rank0.pt"
    state = torch.load(state_path, weights_only=True)
    edit(state)
    torch.save(state, state_path)
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--max-tokens", str(32 * 4 * 10))
    assert_one_line_error(code, err, fragment)
    assert tree_hashes(run) == before


def test_resume_below_the_tokens_done_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--out", str(run), "--resume", "--max-tokens", "256")
    assert_one_line_error(code, err, "more than --max-tokens 256")
    assert tree_hashes(run) == before


def test_latest_pointing_outside_the_folder_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "latest").write_text(f"../{trained_run.name}/checkpoints/step-00000006\n")
    with pytest.raises(SaescopeError, match="not a checkpoint of this folder"):
        load_saes(run)


def _evals(layers, fvu: float) -> list[LayerEval]:
    return [LayerEval(layer=n, fvu=fvu, l0=4.0, dead_frac=0.0, dense_frac=0.0, ce_clean=2.0, ce_sae=2.5, ce_zero=5.0,
                      ce_recovered=0.8333, kl=0.1, passthrough_frac=0.0) for n in layers]


def test_partial_eval_merges_per_layer_and_other_settings_go_beside(tmp_path):
    path = tmp_path / "eval.json"
    settings = {"model": "m", "data": "default", "text_column": "text", "n_tokens": 2048, "ctx_len": 256, "outlier_factor": 5.0}
    write_results(_evals(range(3), 0.5), path, settings, control=_evals(range(3), 0.9))
    written = write_results(_evals([0], 0.25), path, settings)  # `eval --layers 0` without the control
    body = json.loads(path.read_text())
    assert written == path
    assert [(r["layer"], r["fvu"]) for r in body["layers"]] == [(0, 0.25), (1, 0.5), (2, 0.5)]
    assert [r["fvu"] for r in body["control"]] == [0.9, 0.9, 0.9]
    before = path.read_bytes()
    other = write_results(_evals([0], 0.1), path, {**settings, "n_tokens": 64})
    assert other == tmp_path / "eval-2.json" and path.read_bytes() == before
    # a file written before the LM's dtype was recorded could hold fp32 or bf16 figures: nothing merges into it
    fp32 = write_results(_evals([1], 0.2), path, {**settings, "model_dtype": "fp32"})
    assert fp32 == tmp_path / "eval-3.json" and path.read_bytes() == before
    assert write_results(_evals([2], 0.2), fp32, {**settings, "model_dtype": "fp32"}) == fp32  # same dtype: merges
    assert write_results(_evals([1], 0.3), path, {**settings, "model_dtype": "bf16"}) == tmp_path / "eval-4.json"


def test_eval_refuses_invalid_values_before_writing(tiny_sae_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_sae_dir, run)
    (run / "eval.json").write_text('{"layers": []}\n')
    before = tree_hashes(run)
    for flags, fragment in ((["--n-tokens", "0"], "--n-tokens must be >= 1"), (["--n-tokens", "-5"], "--n-tokens must be >= 1"),
                            (["--outlier-factor", "-1"], "--outlier-factor must be >= 0"),
                            (["--outlier-factor", "nan"], "finite"), (["--ctx-len", "0"], "--ctx-len must be >= 2")):
        with pytest.raises(SaescopeError) as exc:
            cli.parse_config(["eval", "--sae", str(run), *flags])
        assert fragment in str(exc.value)
    assert tree_hashes(run) == before
    sae = load_saes(run)[0]
    with torch.no_grad():
        sae.W_dec[3, 5] = float("nan")
    save_saes({0: sae}, run)
    code, _, err = run_cli("eval", "--sae", str(run), "--layers", "0", "--n-tokens", "64")
    assert_one_line_error(code, err, "W_dec holds NaN")
    assert json.loads((run / "eval.json").read_text()) == {"layers": []}


def test_output_paths_that_cannot_be_written_are_refused(tiny_sae_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, fragment in ((tmp_path / "file", "a file exists there"), (tmp_path / "file" / "sub", "is a file")):
        with pytest.raises(SaescopeError, match=fragment):
            cli.parse_config(["export", "--sae", str(tiny_sae_dir), "--to", "saelens", "--out", str(out)])
    for argv in (["report", "--sae", str(tiny_sae_dir), "--out", str(tiny_sae_dir / "layer0.json")],
                 ["plan", "--model", "Qwen/Qwen3-8B", "--json", str(tiny_sae_dir / "layer1.json")]):
        with pytest.raises(SaescopeError, match="is never overwritten"):
            cli.parse_config(argv)
    html = tmp_path / "browser.html"
    html.write_text("old")  # rewriting one's own earlier output is fine; a browser page is a file, not a folder
    cli.parse_config(["features", "browser", "--store", "s", "--out", str(html)])
    assert (tmp_path / "file").read_text() == "x"


def test_export_and_control_never_overwrite_any_file_of_an_sae(tiny_sae_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "layer0.json").write_text('{"mine": 1}')
    code, _, err = run_cli("export", "--sae", str(tiny_sae_dir), "--to", "saescope", "--out", str(out))
    assert_one_line_error(code, err, "already holds layer0.json")
    assert (out / "layer0.json").read_text() == '{"mine": 1}' and not (out / "layer1.json").exists()


def test_sae_folders_that_disagree_with_themselves_are_refused(tiny_sae_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_sae_dir, run)
    cfg = json.loads((run / "layer1.json").read_text())
    (run / "layer1.json").write_text(json.dumps({**cfg, "layer": 2}))
    with pytest.raises(SaescopeError, match="field 'layer' is 2, but the file is layer1"):
        load_saes(run)
    with pytest.raises(SaescopeError, match="--k 16: the SAE of layer 0 .* records k 4"):
        load_saes(tiny_sae_dir, k=16)
    sl = tmp_path / "sl"
    export_saes(load_saes(tiny_sae_dir, layers=[0, 1]), sl, "saelens")
    cfg = json.loads((sl / "layer1" / "cfg.json").read_text())
    (sl / "layer1" / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], "hook_name": "model.layers.0"}}))
    with pytest.raises(SaescopeError, match="two SAEs for layer 0"):
        load_saes(sl)
    for edit, fragment in (({"apply_b_dec_to_input": "no"}, "'apply_b_dec_to_input' must be true/false"),
                           ({"d_in": 999}, "d_in 999 does not match"), ({"metadata": {"hook_name": 5}}, "'hook_name' must be a string")):
        (sl / "layer1" / "cfg.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(SaescopeError, match=fragment):
            load_saes(sl)


def test_a_square_qwen_scope_sae_round_trips(tmp_path):
    sae = TopKSAE(SAEConfig(8, 8, 2))
    sae.init_tied(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))  # W_enc != W_dec.T
    export_saes({3: sae}, tmp_path / "qs-L0_2", "qwen-scope")
    back = load_saes(tmp_path / "qs-L0_2")[3]
    assert torch.equal(back.W_dec, sae.W_dec) and torch.equal(back.W_enc, sae.W_enc)


def test_layer_lists_are_bounded_before_the_model_is_known():
    from saescope.core.train import parse_layers

    with pytest.raises(SaescopeError, match="layer 10000 is out of range: layer numbers are 0..9999"):
        parse_layers("0-100000000000", None)
    with pytest.raises(SaescopeError, match="layer 99999999 is out of range"):
        parse_layers("99999999-100000000", None)
    assert parse_layers("3,1-2", 4) == [1, 2, 3]


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    def broken(_a):
        raise ValueError("something no check foresaw\nsecond line")

    monkeypatch.setitem(cli_train.COMMANDS, "models", cli_train.Command(cli_train.ModelsConfig, broken, "models"))
    monkeypatch.setenv("SAESCOPE_DEBUG", "0")
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["saescope: error: models (saescope models): unexpected ValueError: something no check foresaw (rerun with "
                   "--debug for the traceback, and please report it)"]
    with pytest.raises(ValueError):
        cli.main(["models", "--debug"])


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--sae", "x", "--n-tokens", "many"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "saescope: error: eval: argument --n-tokens: invalid int value: 'many'"]


def test_train_config_ranges():
    for kw, fragment in (({"lr": float("nan")}, "lr must be a finite number"), ({"lr": 0.0}, "lr must be > 0"),
                         ({"sae_dtype": "fp8"}, "sae_dtype must be one of"), ({"layers": "1-"}, "bad layer list"),
                         ({"ctx_len": 1}, "ctx_len must be >= 2"), ({"seed": -1}, "seed must be >= 0"),
                         ({"device": "meta"}, None)):
        if fragment is None:  # the device is checked where it is resolved
            from saescope.core.train import resolve_device

            with pytest.raises(SaescopeError, match="device 'meta' is not supported"):
                resolve_device(kw["device"])
            continue
        with pytest.raises(SaescopeError, match=fragment):
            TrainConfig(**kw)


def test_small_refusals_from_the_audit(monkeypatch, tmp_path, capsys):
    from saescope.api.steer import parse_features
    from saescope.core.data.benchmarks import _format

    with pytest.raises(SaescopeError, match="features must be integers"):
        parse_features("3,,4", "1")
    assert cli.main(["inspect", "--sae", "nowhere", "--texts", "hi", "--baseline", " "]) == 2
    assert "--baseline is empty" in capsys.readouterr().err
    for template in ("{x.__class__}", "{x:>20000000000}", "{}"):
        with pytest.raises(SaescopeError, match="template field"):
            _format(template, {"x": "1"})
    assert _format("{Best Answer} {choices[1]}", {"Best Answer": "a", "choices": ["b", "c"]}) == "a c"
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path / "file"))
    assert cli.main(["models"]) == 2 and "cannot make the cache folder" in capsys.readouterr().err
    monkeypatch.setenv("SAESCOPE_THREADS", "abc")
    assert cli.main(["models"]) == 2 and "SAESCOPE_THREADS must be a positive integer" in capsys.readouterr().err


def _train_argv(tiny_qwen3, text_file, out: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "saescope", "train", "--model", str(tiny_qwen3), "--data", str(text_file), "--preset", "4x-k32",
            "--ctx-len", "32", "--batch-size", "2", "--max-tokens", "16384", "--checkpoint-every", "64", "--seed", str(seed),
            "--activation-buffer", "0", "--out", str(out)]


@pytest.mark.parametrize("first", ["A", "B"])
def test_two_trainings_into_one_folder_one_runs_the_other_refuses(tiny_qwen3, text_file, tmp_path, first):
    """Two `saescope train --out SAME` started together (3 times in each order): exactly one trains, the other refuses
    in one line naming the holder (or, when it comes after the first has finished, the run it holds) and writes
    nothing; the folder is the runner's alone: its train.json, every checkpoint's SAEs and its log are one run's."""
    import subprocess
    import time

    outcomes = []
    for rep in range(3):
        out = tmp_path / f"run{rep}"
        order = {"A": 1, "B": 2} if first == "A" else {"B": 2, "A": 1}
        procs = {}
        for name, seed in order.items():
            procs[name] = subprocess.Popen(_train_argv(tiny_qwen3, text_file, out, seed), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
            time.sleep(0.3)
        done = {name: (p.wait(timeout=600), *p.communicate()) for name, p in procs.items()}
        ran = [n for n, (code, _, _) in done.items() if code == 0]
        refused = [n for n, (code, _, _) in done.items() if code == 2]
        assert len(ran) == 1 and len(refused) == 1, done
        err = done[refused[0]][2]
        lines = [ln for ln in err.splitlines() if ln.startswith("saescope: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "is in use by another saescope process (pid" in lines[0] or "already holds a run" in lines[0], lines[0]
        winner_seed = {"A": 1, "B": 2}[ran[0]]
        assert json.loads((out / "train.json").read_text())["seed"] == winner_seed
        checkpoints = sorted((out / "checkpoints").iterdir())
        assert [c.name for c in checkpoints if c.name.startswith(".")] == []  # no staging folder left behind
        for ckpt in checkpoints:
            for layer in ckpt.glob("layer*.json"):
                assert json.loads(layer.read_text())["step"] == int(ckpt.name.split("-")[1])
        steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's log, not two interleaved
        assert load_saes(out)  # what eval and --resume read is whole
        outcomes.append((ran[0], "in use" if "in use" in lines[0] else "holds a run"))
    print(f"order {first} first: {outcomes}")
