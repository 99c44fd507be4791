"""Behaviour metrics by hand and on real responses, and the feature contrasts against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import SHARED, shared_file

from saescope.api.behaviour import LanguageID, behaviour_stats, distinct_n, ends_in_loop, mgsm_accuracy
from saescope.api.scope import Scope
from saescope.apps.discover import language_features, repeat_pairs, repetition_features
from saescope.core.errors import SaescopeError

RESPONSES = SHARED / "multilingual" / "m_ifeval" / "responses"


def test_loops_by_hand():
    assert ends_in_loop("I am here. " + "I am missing the classes, the lessons. " * 4)
    assert ends_in_loop("yes " * 20)
    assert ends_in_loop("Intro. " + "a b c d e f g h i j " * 2 + "a b c")  # cut mid-block by the length limit
    assert not ends_in_loop("The cat sat on the mat and then it went to sleep because it was tired after the day.")
    assert not ends_in_loop("yes yes yes")  # shorter than the 16-unit minimum
    assert not ends_in_loop("a b c d e f g h i j " * 2 + "done")


@given(st.lists(st.sampled_from(["a", "b", "c", ".", "dog"]), min_size=1, max_size=6), st.integers(3, 8))
def test_a_repeated_block_is_always_a_loop(block, times):
    text = " ".join(block * max(times, 16 // len(block) + 1))
    assert ends_in_loop("Some unrelated start. " + text)


def test_distinct_n_by_hand():
    assert distinct_n("a b a b", 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n("one", 2) == 1.0
    assert distinct_n("x x x x x", 1) == pytest.approx(1 / 5)


def test_repeat_pairs_by_hand():
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 1, 2, 3, 4]
    assert repeat_pairs(ids, n=4) == [(3, 13)]  # the 4-gram ending at 3 recurs last at 13
    assert repeat_pairs([5, 6, 7, 8], n=4) == []


def test_loop_rate_separates_real_models():
    strong = [json.loads(x)["response"] for x in shared_file(RESPONSES / "en__gpt-4o-2024-08-06.jsonl").read_text().splitlines()]
    weak_file = shared_file(RESPONSES / "en__Qwen__Qwen2.5-0.5B-Instruct-GPTQ-Int4.jsonl")
    weak = [json.loads(x)["response"] for x in weak_file.read_text().splitlines()]
    assert behaviour_stats([r for r in strong if r]).loop_rate < 0.01
    assert behaviour_stats([r for r in weak if r]).loop_rate > 0.1


def test_language_id_on_held_out_mgsm():
    shared_file(SHARED / "multilingual" / "mgsm" / "mgsm_en.tsv")
    lid = LanguageID.fit_mgsm()
    assert mgsm_accuracy(lid) > 0.97  # problems 200-249, never fitted on
    assert lid.identify("1234 + 5 = ?") is None
    with pytest.raises(SaescopeError, match="two languages"):
        LanguageID.fit({"en": ["hello"]})


@pytest.fixture(scope="module")
def scope(tiny_sae_dir):
    return Scope.load(str(tiny_sae_dir))


def test_repetition_contrast_matches_a_direct_computation(scope):
    texts = ["one two three four five one two three four five one two three four five", "the cat sat. the cat sat. the cat sat."]
    ranked, pairs = repetition_features(scope, 1, texts, top=64, n=4)
    on, off, count = torch.zeros(64), torch.zeros(64), 0
    for codes in scope.encode(texts, layers=[1], progress=False):
        dense = codes.layers[1].dense(64)
        for a, b in repeat_pairs(codes.input_ids.tolist(), 4):
            if a > 0:
                on, off, count = on + dense[b], off + dense[a], count + 1
    assert pairs == count > 0
    want = (on - off) / count
    assert ranked[0].feature == int(want.argmax())
    assert all(r.nu == pytest.approx(float(want[r.feature]), abs=1e-5) for r in ranked)
    with pytest.raises(SaescopeError, match="repeats"):
        repetition_features(scope, 1, ["no repetition here at all"], top=3)


def test_language_contrast_matches_pooled_means(scope):
    by_lang = {"en": ["The farmer has three cows.", "She buys two apples."],
               "fr": ["Le fermier a trois vaches.", "Elle achète deux pommes."],
               "es": ["El granjero tiene tres vacas.", "Ella compra dos manzanas."]}
    ranked = language_features(scope, 1, by_lang, "fr", top=5)
    means = {lang: scope.pooled(t, layer=1, pool="mean", skip_first_token=True, progress=False).mean(0) for lang, t in by_lang.items()}
    nu = means["fr"] - (means["en"] + means["es"]) / 2
    assert [r.feature for r in ranked] == torch.argsort(nu, descending=True)[:5].tolist()
    with pytest.raises(SaescopeError, match="no texts in 'de'"):
        language_features(scope, 1, by_lang, "de")


def test_cli_discover_repetition_and_language(tiny_sae_dir, tmp_path):
    from tests.conftest import run_cli

    loops = tmp_path / "loops.jsonl"
    loops.write_text("".join(json.dumps({"text": "Answer: " + "the farmer sells eggs at the market. " * 6}) + "\n" for _ in range(3)))
    out = tmp_path / "rep.json"
    code, stdout, err = run_cli("discover", "--sae", str(tiny_sae_dir), "--layer", "1", "--behaviour", "repetition",
                                "--texts", str(loops), "--top", "4", "--select", "1", "--verify", "2", "--max-new-tokens", "8",
                                "--strength", "3", "--out", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert len(doc["ranked"]) == 4 and doc["selected"] == [doc["ranked"][0]["feature"]]
    dirs = [c["direction"] for c in doc["steering_check"]]
    f = doc["selected"][0]
    assert dirs == ["none"] + [f"feature {f}"] * 2 + [f"control {f}"] * 2  # the control's direction of the same id
    assert doc["control"] == "random (seed 0, in memory)"
    assert {c["strength"] for c in doc["steering_check"][1:]} == {-3.0, 3.0}
    shared_file(SHARED / "multilingual" / "mgsm" / "mgsm_fr.tsv")
    out = tmp_path / "fr.json"
    code, stdout, err = run_cli("discover", "--sae", str(tiny_sae_dir), "--layer", "1", "--behaviour", "language:fr",
                                "--top", "3", "--select", "1", "--verify", "2", "--max-new-tokens", "4", "--strength", "2",
                                "--out", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["n_texts"] == 2200 and all(c["language_rate"] is not None for c in doc["steering_check"])


@pytest.mark.parametrize("args,fragment", [
    (["--behaviour", "rudeness"], "use repetition or language:LANG"),
    (["--behaviour", "language:xx"], "language 'xx' is not in MGSM"),
    (["--behaviour", "repetition", "--top", "2", "--select", "3"], "--select 3 exceeds --top 2"),
    (["--behaviour", "repetition", "--layer", "7"], "layer 7"),
])
def test_cli_discover_refusals(tiny_sae_dir, tmp_path, args, fragment):
    from tests.conftest import assert_one_line_error, run_cli

    args = args if "--layer" in args else [*args, "--layer", "1"]
    code, _, err = run_cli("discover", "--sae", str(tiny_sae_dir), *args, "--verify", "0", "--out", str(tmp_path / "f.json"))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "f.json").exists()
