"""Correctness sources: the real M-IFEval responses, the sloth leaderboard subtasks, and CSV files."""

import numpy as np
import pytest

from saescope import SaescopeError
from saescope.data.benchmarks import shared_data_dir
from saescope.redundancy.analysis import perf_redundancy
from saescope.redundancy.performance import load_correctness, read_sloth


@pytest.fixture(scope="module")
def shared():
    try:
        return shared_data_dir()
    except SaescopeError as exc:
        pytest.skip(f"needs ../shared/data (the shared reference data beside the repo): {exc}")


def test_m_ifeval_is_17_models_by_the_prompts_with_strict_prompt_level_correctness(shared):
    c = load_correctness("m_ifeval:ja")
    assert c.matrix.shape == (17, 172) and c.benchmark == "m_ifeval_ja" and c.granularity == "item"
    assert set(np.unique(c.matrix)) <= {0.0, 1.0}
    best = c.models[int(c.matrix.mean(1).argmax())]
    assert "Qwen2.5-0.5B" not in best  # the smallest model is not the best one
    r = perf_redundancy(c, repeats=5)
    assert 0.3 < r["r"]["mean"] < 1.0 and r["items"] == 172


def test_sloth_subtasks_drop_models_without_scores_and_say_so(shared):
    c = load_correctness("sloth:mmlu")
    assert c.matrix.shape[1] == 57 and c.granularity == "subtask" and not np.isnan(c.matrix).any()
    models, cols = read_sloth()
    n_nan = int(np.isnan(np.column_stack([cols[i] for i in c.items])).any(1).sum())
    assert c.matrix.shape[0] == len(models) - n_nan and f"{n_nan} of {len(models)} models dropped" in c.notes[0]
    assert load_correctness("sloth:bbh").matrix.shape[1] == 24


def test_csv_correctness_and_its_errors(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("model,q1,q2,q3\nm1,1,0,1\nm2,0,0,1\nm3,1,1,1\n")
    c = load_correctness(str(good))
    assert c.models == ["m1", "m2", "m3"] and c.items == ["q1", "q2", "q3"] and c.matrix.sum() == 6
    saved = tmp_path / "excel.csv"  # a spreadsheet's byte-order mark and a trailing blank line are not errors
    saved.write_bytes("\ufeffmodel,q1,q2\r\nm1,1,0\r\nm2,0,0\r\nm3,1,1\r\n\r\n".encode())
    assert load_correctness(str(saved)).matrix.shape == (3, 2)
    cases = {"model,q1,q2\nm1,1,0\nm2,1\nm3,0,0\n": "line 3: 1 values for 2 items",
             "model,q1,q2\nm1,1,0\nm2,1,1\n": "needs at least 3",
             "model,q1,q2\nm1,1,0\nm2,1,nan\nm3,0,0\n": "values must be in",
             "model,q1,q1\nm1,1,0\nm2,1,1\nm3,0,0\n": "item names repeat",
             "name,q1\nm1,1\n": "header starting with 'model'",
             "model,q1,q2\nm1,1,0\nm1,1,1\nm3,0,0\n": "a model appears twice"}
    for i, (text, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(SaescopeError, match=msg):
            load_correctness(str(bad))
    with pytest.raises(SaescopeError, match="not m_ifeval:LANG"):
        load_correctness(str(tmp_path / "missing.csv"))
    with pytest.raises(SaescopeError, match="subtask scores exist for"):
        load_correctness("sloth:hellaswag")
