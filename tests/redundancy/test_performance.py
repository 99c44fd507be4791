"""Correctness sources: the real M-IFEval responses, the sloth leaderboard subtasks, and CSV files."""

import numpy as np
import pytest

from saescope import SaescopeError
from saescope.apps.redundancy.analysis import perf_redundancy
from saescope.apps.redundancy.performance import bench_scores, load_correctness, read_scores
from saescope.core.data.benchmarks import shared_data_dir


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
    table = read_scores()
    n_nan = int(np.isnan(np.column_stack([table.numbers(i) for i in c.items])).any(1).sum())
    models = table.models
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
             "name,q1\nm1,1\n": "one column named 'model' \\(columns found: 'name', 'q1'\\)",
             "": "empty file",
             "model,q1\nm1,1\nm2,0\nm3,1\n": "1 item columns; R\\(D\\) needs at least 2",
             "model,q1,q2\nm1,1,0\nm2,,1\nm3,0,0\n": "line 3, item 'q1': '' is not a number",
             "model,q1,q2\nm1,1,0\nm2,yes,1\nm3,0,0\n": "line 3, item 'q1': 'yes' is not a number",
             "model,q1,q2\nm1,1,0\nm1,1,1\nm3,0,0\n": "a model appears twice"}
    for i, (text, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(SaescopeError, match=msg) as exc:
            load_correctness(str(bad))
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("model,q1,q2\nm\xe9,1,0\n".encode("latin-1"))
    with pytest.raises(SaescopeError, match="latin.csv line 2: not UTF-8 text"):
        load_correctness(str(latin))
    with pytest.raises(SaescopeError, match="not m_ifeval:LANG"):
        load_correctness(str(tmp_path / "missing.csv"))
    with pytest.raises(SaescopeError, match="subtask scores exist for"):
        load_correctness("sloth:hellaswag")


BENCHES = ["gsm8k", "math", "arc_challenge", "mmlu", "m_ifeval_en"]


def test_any_score_table_matches_its_columns_to_the_benchmarks(tmp_path):
    table = tmp_path / "mine.csv"
    table.write_text("family,Model,GSM8K,Math,arc_challenge,notes\nqwen,a,0.5,0.2,,x\nllama,b,0.6,0.3,0.7,y\n"
                     "qwen,c,0.7,0.4,0.8,z\n")
    s = bench_scores(BENCHES, table)
    assert s.columns == {"gsm8k": "GSM8K", "math": "Math", "arc_challenge": "arc_challenge"}
    assert np.isnan(s.values["arc_challenge"][0]) and s.values["gsm8k"].tolist() == [0.5, 0.6, 0.7]  # an empty cell: no score
    assert any("2 columns match no footprinted benchmark and are ignored (family, notes)" in n for n in s.notes)
    assert any("no score column for: mmlu, m_ifeval_en" in n for n in s.notes)
    # the leaderboard's headline names ('MATH Lvl 5') match too; an explicit mapping replaces the matching
    table.write_text("model,MATH Lvl 5,Grade school,ARC\na,1,2,3\nb,2,3,4\nc,3,4,5\n")
    assert bench_scores(BENCHES, table).columns == {"math": "MATH Lvl 5", "arc_challenge": "ARC"}
    assert bench_scores(BENCHES, table, {"Grade school": "gsm8k"}).columns == {"gsm8k": "Grade school"}


def test_score_table_errors_name_the_file_and_the_field(tmp_path):
    cases = {"": "empty file",
             "name,GSM8K\na,1\n": "one column named 'model' \\(columns found: 'name', 'GSM8K'\\)",
             "model,MATH Lvl 4,Accuracy\na,1,2\n": "no column matches a footprinted benchmark \\(columns: MATH Lvl 4, Accuracy; "
                                                     "expected: gsm8k \\(or 'GSM8K'\\), math \\(or 'MATH Lvl 5'\\)",
             "model,gsm8k,math\na,1,2\nb,0.5,n/a\nc,1,1\n": "line 3, column 'math': 'n/a' is not a number",
             "model,gsm8k,math\na,1,2\nb,0.5\n": "line 3: 2 cells for 3 columns",
             "model,gsm8k,GSM8K\na,1,2\n": "columns 'gsm8k' and 'GSM8K' both match benchmark gsm8k",
             "model,gsm8k,math\na,inf,2\nb,1,1\nc,2,2\n": "'inf' is not a finite number",
             "model,gsm8k,math\na,1,2\nb,1e308,1\nc,2,2\n": "line 3, column 'gsm8k': '1e308' is not a score",
             "model,gsm8k,math\na,1,2\nb,2,1\na,2,2\n": "line 4: model 'a' appears twice \\(first on line 2\\)",
             "model,gsm8k,math\na,1,2\nb,2,1\n": "2 models; correlating scores across models needs at least 3"}
    for i, (text, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(SaescopeError, match=msg) as exc:
            bench_scores(BENCHES, bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    good = tmp_path / "good.csv"
    good.write_text("model,gsm8k,Score\na,1,2\nb,2,3\nc,3,4\n")
    with pytest.raises(SaescopeError, match="has no column 'nope' \\(columns: gsm8k, Score\\)"):
        bench_scores(BENCHES, good, {"nope": "math"})
    with pytest.raises(SaescopeError, match="'humaneval' is not a footprinted benchmark"):
        bench_scores(BENCHES, good, {"Score": "humaneval"})
    with pytest.raises(SaescopeError, match="scores file not found"):
        bench_scores(BENCHES, tmp_path / "missing.csv")
