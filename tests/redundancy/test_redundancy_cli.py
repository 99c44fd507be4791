"""footprint -> report -> compare end to end on a tiny Qwen3 with real benchmark prompts from ../shared/data,
beside a random control, and the bad inputs the issue lists."""

import json

import numpy as np
import pytest
import torch
from test_analysis import _scored_folder

from conftest import assert_one_line_error, run_cli
from saescope import SaescopeError
from saescope.api.scope import Scope
from saescope.apps.redundancy.analysis import analyse
from saescope.apps.redundancy.footprint import Footprints
from saescope.apps.report.page import build_report
from saescope.cli import main
from saescope.core.data.benchmarks import load_benchmark, shared_data_dir
from saescope.core.io import save_native
from saescope.core.sae import SAEConfig, TopKSAE

BENCHES = "gsm8k,math,arc_challenge,winogrande,mmlu,m_ifeval_en,m_ifeval_fr,m_ifeval_es"


@pytest.fixture(scope="module")
def run(tiny_qwen3, tmp_path_factory):
    try:
        shared_data_dir()
    except SaescopeError as exc:
        pytest.skip(f"needs ../shared/data (real benchmark prompts): {exc}")
    out = tmp_path_factory.mktemp("run")
    for n in (1, 2):
        sae = TopKSAE(SAEConfig(64, 256, 8))
        sae.init_tied(torch.Generator().manual_seed(n))
        sae.meta = {"model": str(tiny_qwen3)}
        save_native(sae, out, n)
    code, _, err = run_cli("control", "random", "--like", str(out), "--out", str(out / "control"))
    assert code == 0, err
    code, stdout, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", BENCHES, "--limit", "12",
                             "--control", str(out / "control"), "--batch-size", "5")
    assert code == 0, err
    return out, stdout


def test_footprints_are_the_active_features_at_the_last_token(run, tiny_qwen3):
    out, stdout = run
    fp = Footprints.load(out / "redundancy")
    assert fp.benchmarks == BENCHES.split(",") and fp.layers == [1, 2] and fp.has_control
    bench = load_benchmark("gsm8k", limit=12)
    scope = Scope.load(str(out))
    want = scope.pooled(bench.prompts, layer=2, pool="last")
    got = fp.sets("gsm8k", 2)
    assert len(got) == 12
    for i in range(12):
        assert sorted(got.indices[got.indptr[i]:got.indptr[i + 1]].tolist()) == want[i].nonzero().flatten().tolist()
    ctl = fp.sets("gsm8k", 2, "control")
    assert np.all(np.diff(ctl.indptr) <= 8) and not np.array_equal(ctl.indices, got.indices)
    # a rerun keeps what is there; other settings in the same folder are refused, naming the difference
    code, stdout, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", "gsm8k", "--limit", "12",
                             "--control", str(out / "control"))
    assert code == 0 and "(gsm8k already there: kept)" in stdout, err
    code, _, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", "gsm8k", "--limit", "12", "--pool", "max")
    assert_one_line_error(code, err, "pool: 'last' there, 'max' now")


def test_report_and_compare_write_json_pngs_and_an_html_section(run):
    out, _ = run
    fp = out / "redundancy"
    code, stdout, err = run_cli("redundancy", "report", str(fp), "--repeats", "20", "--matched-repeats", "5")
    assert code == 0, err
    res = json.loads((fp / "redundancy.json").read_text())
    assert res["layer"] == 2 and set(res["sets"]) == {"sae", "control"} and set(res["control_agreement"]) == {"1", "2"}
    e = res["sets"]["sae"]["2"]
    nb = len(res["benchmarks"])
    assert np.allclose(np.diag(np.array(e["overlap"])), 1.0) and len(e["matched"]["overlap"]) == nb
    assert all(0 < e["r_hat"][b]["mean"] <= 1 for b in res["benchmarks"])
    assert len(res["statements"]) == nb * (nb - 1) and "inside" in stdout
    for png in ("overlap-matched-L2.png", "overlap-raw-L2.png", "coverage.png"):
        assert (fp / png).stat().st_size > 1000
    code, stdout, err = run_cli("redundancy", "compare", str(fp), "--perf", "m_ifeval:en,m_ifeval:es,m_ifeval:fr",
                             "--repeats", "3", "--n-perm", "200")
    assert code == 0, err
    cmp = json.loads((fp / "compare.json").read_text())
    r = cmp["r_vs_rhat"]["sae"]
    assert r["benchmarks"] == ["m_ifeval_en", "m_ifeval_es", "m_ifeval_fr"] and -1 <= r["spearman"] <= 1
    # pairs among gsm8k, math, arc_challenge, winogrande, mmlu: 10, of which 6 without MMLU for the partial correlation
    assert cmp["pairs"]["sae/matched"]["n_pairs"] == 10 and cmp["pairs"]["sae/matched"]["partial_pairs"] == 6
    assert "control/matched" in cmp["pairs"]
    # leaderboard v2 columns (IFEval, BBH, MATH) are missing for v1-only models: those are dropped per pair, and said
    assert cmp["pair_models_dropped_for_nan"]["gsm8k-math"] > 0 and "dropped for a missing score" in stdout
    page = build_report(out).read_text()
    assert "Benchmark redundancy" in page and "Checked against performance data" in page
    assert page.index("Benchmark redundancy") < page.index("Checked against performance data")


def test_bad_inputs_get_one_line_errors(run, tmp_path):
    out, _ = run
    code, _, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", "gsm8k,nosuchbench")
    assert_one_line_error(code, err, "nosuchbench")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n{"q": "b"}\n')
    code, _, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", str(bad), "--template", "Q: {question}")
    assert_one_line_error(code, err, "no field 'question'")
    code, _, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", "hf:openai/gsm8k", "--column", "question")
    assert_one_line_error(code, err, "Hugging Face dataset")  # no hub here: the offline answer, not a traceback
    code, _, err = run_cli("redundancy", "footprint", "--sae", str(out), "--bench", "gsm8k", "--limit", "0")
    assert_one_line_error(code, err, "--limit must be >= 1, got 0")
    code, _, err = run_cli("redundancy", "report", str(tmp_path))
    assert_one_line_error(code, err, "no footprints in")
    code, _, err = run_cli("redundancy", "compare", str(tmp_path))
    assert_one_line_error(code, err, "run saescope redundancy report")
    two = tmp_path / "two.csv"
    two.write_text("model,a,b\nm1,1,0\nm2,0,1\n")
    code, _, err = run_cli("redundancy", "compare", str(out / "redundancy"), "--perf", str(two))
    assert_one_line_error(code, err, "needs at least 3")


def test_flags_and_inputs_are_checked_before_any_file_is_written(tmp_path, capsys):
    """In-process (no model, no shared data): a bad flag, scores table or redundancy.json is one line, exit 2, and the
    files already in the folder stay as they were."""
    fp = tmp_path / "fp"
    (fp / "redundancy.json").parent.mkdir()
    (fp / "redundancy.json").write_text(json.dumps(analyse(_scored_folder(fp), repeats=5, matched_repeats=3, progress=False)))
    (fp / "compare.json").write_text('{"kept": true}')
    before = {p: p.read_bytes() for p in fp.rglob("*") if p.is_file()}
    scores = tmp_path / "scores.csv"
    scores.write_text("model,Accuracy,Speed\na,1,2\n")
    nosae = str(tmp_path / "no-sae")
    cases = [(["report", str(fp), "--repeats", "0"], "--repeats must be >= 1, got 0"),
             (["report", str(fp), "--subsume", "1.5"], "--subsume must be <= 1, got 1.5"),
             (["compare", str(fp), "--n-perm", "-1"], "--n-perm must be >= 1, got -1"),
             (["compare", str(fp), "--scores", str(scores)], "no column matches a footprinted benchmark (columns: Accuracy, Speed; "
                                                            "expected: gsm8k (or 'GSM8K'), math (or 'MATH Lvl 5')"),
             (["compare", str(fp), "--scores", str(scores), "--score-columns", "Accuracy"], "--score-columns: expected COLUMN=BENCHMARK"),
             (["footprint", "--sae", nosae, "--bench", "gsm8k", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
             (["footprint", "--sae", nosae, "--bench", "gsm8k", "--limit", "-3"], "--limit must be >= 1, got -3"),
             (["footprint", "--sae", nosae, "--bench", "gsm8k", "--max-length", "1"], "--max-length must be >= 2, got 1")]
    for argv, msg in cases:
        code = main(["redundancy", *argv])
        assert_one_line_error(code, capsys.readouterr().err, msg)
    assert {p: p.read_bytes() for p in fp.rglob("*") if p.is_file()} == before
    (fp / "redundancy.json").write_text("{}")
    assert_one_line_error(main(["redundancy", "compare", str(fp)]), capsys.readouterr().err, "redundancy.json: field 'layer' is missing")
    assert (fp / "compare.json").read_text() == '{"kept": true}'
    # any per-model table with a model column and benchmark-named columns is a scores table; the rest is ignored, said once
    (fp / "redundancy.json").write_bytes(before[fp / "redundancy.json"])
    scores.write_text("Model,GSM8K,MATH,ARC,Winogrande,mmlu,size\n" + "".join(
        f"m{i},{(i * 7) % 10},{(i * 3) % 10},{(i * 5) % 11},{i % 4},{(i * i) % 13},{i}\n" for i in range(9)))
    assert main(["redundancy", "compare", str(fp), "--scores", str(scores), "--perf", "", "--n-perm", "20"]) == 0
    out = capsys.readouterr().out
    assert "note: scores.csv: 1 columns match no footprinted benchmark and are ignored (size)" in out
    cmp = json.loads((fp / "compare.json").read_text())
    assert cmp["score_columns"]["arc_challenge"] == "ARC" and cmp["pairs"]["sae/matched"]["n_pairs"] == 10
