"""The trust commands end to end on a tiny Qwen3: seeds -> stability, control -> eval, fine-tune -> transfer,
and the HTML report that gathers them."""

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from saescope.api.finetune import fine_tune
from saescope.apps.report.page import build_report
from saescope.core.models import load_model


@pytest.fixture(scope="module")
def seed_runs(tiny_qwen3, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    code, stdout, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(out), "--layers", "1,2",
                             "--preset", "4x-k32", "--ctx-len", "32", "--batch-size", "8", "--max-tokens", "8192",
                             "--seeds", "2", "--seed", "3")
    assert code == 0, err
    return out, stdout


def test_train_seeds_trains_the_pair_on_the_same_data_and_compares_it(seed_runs):
    out, stdout = seed_runs
    cfgs = [json.loads((out / f"seed-{s}" / "train.json").read_text()) for s in (3, 4)]
    assert [c["seed"] for c in cfgs] == [3, 4] and [c["data_seed"] for c in cfgs] == [3, 3]
    rep = json.loads((out / "seed-3" / "trust" / "stability-seed-4.json").read_text())
    assert set(rep["layers"]) == {"1", "2"} and set(rep["control"]) == {"1", "2"}
    for r in rep["layers"].values():
        shares = r["decoder"]["one_to_one"]
        assert 0 <= shares["0.9"] <= shares["0.7"] <= shares["0.5"] <= 1
        assert r["activations"]["tokens"] > 0 and r["unstable"]
    assert "cos>=0.5" in stdout
    moved = [json.loads((out / f"seed-{s}" / "train_summary.json").read_text())["layers"]["1"]["decoder_cos_to_init"]
             for s in (3, 4)]
    assert all(-1 <= c <= 1 for c in moved) and rep["layers"]["1"]["decoder_cos_to_init"] == moved


def test_control_eval_stability_report(seed_runs, tmp_path):
    out, _ = seed_runs
    a, b, ctrl = out / "seed-3", out / "seed-4", tmp_path / "ctrl"
    code, stdout, err = run_cli("control", "random", "--like", str(a), "--out", str(ctrl), "--seed", "1")
    assert code == 0, err
    code, stdout, err = run_cli("eval", "--sae", str(a), "--control", str(ctrl), "--n-tokens", "512", "--ctx-len", "32")
    assert code == 0, err
    ev = json.loads((a / "eval.json").read_text())
    assert [r["layer"] for r in ev["control"]] == [1, 2]
    # the control keeps exactly k latents firing, and its clean/zero CE are the trained SAEs' (shared passes)
    assert all(c["l0"] == 32.0 for c in ev["control"])
    assert all(c["ce_clean"] == r["ce_clean"] and c["ce_zero"] == r["ce_zero"] for r, c in zip(ev["layers"], ev["control"]))
    assert all(r["fvu"] < c["fvu"] for r, c in zip(ev["layers"], ev["control"])), ev

    code, stdout, err = run_cli("control", "random", "--like", str(a), "--out", str(tmp_path / "pca"), "--subspace", "pca",
                             "--n-tokens", "1024", "--variance", "0.8")
    assert code == 0, err
    meta = json.loads((tmp_path / "pca" / "layer1.json").read_text())["control"]
    assert meta["kind"] == "random-subspace" and 1 <= meta["subspace_dim"] < 64

    code, stdout, err = run_cli("stability", "--sae", str(a), "--sae", str(b), "--control", str(ctrl), "--n-tokens", "512")
    assert code == 0, err
    rep = json.loads((a / "trust" / "stability.json").read_text())
    assert set(rep["control"]) == {"1", "2"}
    assert "control" in stdout

    code, _, err = run_cli("report", "--sae", str(a))
    assert code == 0, err
    page = (a / "report.html").read_text()
    for section in ("Training", "Evaluation", "Random control", "Seed stability", "Transfer"):
        assert section in page
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page


def test_control_and_stability_bad_input(seed_runs, tmp_path):
    out, _ = seed_runs
    a = out / "seed-3"
    code, _, err = run_cli("stability", "--sae", str(a))
    assert_one_line_error(code, err, "exactly two SAE sets")
    code, _, err = run_cli("control", "random", "--like", str(a), "--out", str(tmp_path / "c"), "--layers", "1")
    assert code == 0, err
    code, _, err = run_cli("eval", "--sae", str(a), "--control", str(tmp_path / "c"))
    assert_one_line_error(code, err, "no SAE for layer 2")
    code, _, err = run_cli("train", "--out", str(tmp_path / "x"), "--seeds", "0")
    assert_one_line_error(code, err, "--seeds must be >= 1")


def test_finetune_lowers_the_loss_and_transfer_reports_both_models(seed_runs, tiny_qwen3, real_texts, tmp_path):
    out, _ = seed_runs
    lm = load_model(str(tiny_qwen3))
    losses = fine_tune(lm, real_texts[:200], steps=12, lr=3e-3, max_length=32, batch_size=4, progress=False)
    assert len(losses) == 12 and losses[-1] < losses[0]
    lm.model.save_pretrained(tmp_path / "ft")
    lm.tokenizer.save_pretrained(tmp_path / "ft")
    code, stdout, err = run_cli("transfer", "--sae", str(out / "seed-3"), "--model", str(tmp_path / "ft"), "--n-tokens", "512",
                             "--ctx-len", "32", "--out", str(tmp_path / "run" / "trust" / "transfer-ft.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "trust" / "transfer-ft.json").read_text())
    assert [r["layer"] for r in rep["layers"]] == [1, 2]
    for r in rep["layers"]:
        assert r["fvu_source"] != r["fvu_target"] and r["freq_shift_l1"] > 0 and len(r["shifted"]) == 10
        s = r["shifted"]
        assert abs(s[0]["freq_target"] - s[0]["freq_source"]) >= abs(s[-1]["freq_target"] - s[-1]["freq_source"])
    page = build_report(tmp_path / "run").read_text()
    ce = rep["eval_target"][0]["ce_clean"]
    assert "transfer-ft.json" in page and "held-out text (embedded corpus)" in page
    assert f"{ce:.4f} (target)" in page and "<code>saescope transfer" not in page


def test_transfer_refuses_a_model_of_another_width(seed_runs, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out, _ = seed_runs
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "narrow")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "narrow")
    code, _, err = run_cli("transfer", "--sae", str(out / "seed-3"), "--model", str(tmp_path / "narrow"))
    assert_one_line_error(code, err, "d_model 64, but")
