import json

import pytest

from saescope import SaescopeError
from saescope.apps.report.page import build_report


def test_empty_run_says_which_command_fills_each_section(tmp_path):
    page = build_report(tmp_path).read_text()
    for command in ("saescope train", "saescope eval", "saescope control random", "saescope stability", "saescope transfer"):
        assert command in page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(SaescopeError, match="run folder not found"):
        build_report(tmp_path / "nope")


def test_a_corrupt_or_ill_typed_optional_file_skips_its_section_with_a_note(tmp_path):
    """The page is still written; each bad file is named, with its field, on the page and in a warning."""
    row = {"layer": 0, "fvu": 0.1, "l0": 8.0, "dead_frac": 0.0, "dense_frac": 0.0, "ce_clean": 2.0, "ce_sae": 2.1,
           "ce_zero": 5.0, "ce_recovered": 0.97, "kl": 0.01}
    (tmp_path / "eval.json").write_text('{"layers": [')
    (tmp_path / "train.json").write_text('{"model": 7}')
    (tmp_path / "train_log.jsonl").write_text('{"tokens": 10, "layers": {"0": {"fvu": 0.5, "dead_frac": 0.1}}}\n')
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "stability.json").write_text(json.dumps({"a": "x", "b": "y", "layers": {"0": {"decoder": {}}}}))
    (tmp_path / "trust" / "transfer.json").write_text(json.dumps({"source": "s", "target": "t", "layers": [{**row, "shifted": []}]}))
    (tmp_path / "redundancy").mkdir()
    (tmp_path / "redundancy" / "report-section.html").write_bytes(b"<h2>\xff\xfe</h2>")
    with pytest.warns(UserWarning) as caught:
        page = build_report(tmp_path).read_text()
    said = " ".join(str(w.message) for w in caught)
    for fragment in ("eval.json: not valid JSON", "train.json: field 'model' must be a string, got 7",
                     "stability.json: unexpected content (KeyError: 'max_cos_a_to_b')",
                     "transfer.json: layers[0]: field 'fvu_source' is missing", "report-section.html: not a UTF-8 HTML section"):
        assert fragment in said and fragment.replace("'", "&#x27;") in page, fragment
    assert page.count("Section skipped") == 7 and page.rstrip().endswith("</html>")  # eval.json: evaluation, control, margins
    assert said.count("eval.json: not valid JSON") == 1  # two sections skipped, one warning
    assert len(caught) == len({str(w.message) for w in caught}) == 5
    (tmp_path / "eval.json").write_text(json.dumps({"layers": [{**row, "kl": "low"}]}))
    with pytest.warns(UserWarning, match="eval.json: layers\\[0\\]: field 'kl' must be a number, got 'low'"):
        build_report(tmp_path)


def test_the_probing_verdict_counts_only_differences_beyond_two_standard_errors():
    from saescope.apps.report.page import _probing_verdict

    se = 0.02  # each side: the difference's se is 0.02 * sqrt(2) = 0.0283, two of them 0.0566
    rows = {"0": {"sae_top1": 0.90, "control_top1": 0.80, "sae_top1_se": se, "control_top1_se": se},  # +0.10: a win
            "1": {"sae_top1": 0.85, "control_top1": 0.80, "sae_top1_se": se, "control_top1_se": se},  # +0.05: ahead, noise
            "2": {"sae_top1": 0.70, "control_top1": 0.80, "sae_top1_se": se, "control_top1_se": se}}  # -0.10: a loss
    got = _probing_verdict(rows)
    assert "trained 0.817, control 0.800" in got
    assert "ahead at 2 of 3 layers, by more than two standard errors at 1, behind by more than two at 1" in got
    assert "not yet distinguishable from random directions" in got
    rows["2"]["sae_top1"] = 0.95
    assert "carry these concepts better than random directions" in _probing_verdict(rows)


def test_the_quality_section_uses_the_paired_margin_and_reports_the_letter_latents(tmp_path):
    from saescope.apps.report.page import _probing_verdict

    def row(sae, ctl, margin, se, letter, ctl_letter):
        return {"sae_top1": sae, "control_top1": ctl, "sae_top5": 0.8, "control_top5": 0.8, "dense": 0.9,
                "sae_fvu_in_domain": 0.2, "sae_top1_se": 0.05, "control_top1_se": 0.05, "top1_margin": margin,
                "top1_margin_se": se, "sae_letter_main_f1": letter, "control_letter_main_f1": ctl_letter,
                "sae_absorption": 0.02}

    # +0.05 with a paired se of 0.01 is a win, though the two binomial se (0.05 each) would call it noise
    rows = {"0": row(0.85, 0.80, 0.05, 0.01, 0.40, 0.20), "1": row(0.80, 0.80, 0.0, 0.01, 0.10, 0.20)}
    assert "by more than two standard errors at 1, behind by more than two at 0" in _probing_verdict(rows)
    (tmp_path / "quality.json").write_text(json.dumps({"layers": rows, "probing": {"tasks": {"t": {}}}}))
    page = build_report(tmp_path).read_text()
    assert "+0.050 ± 0.010" in page
    assert "better probe than the control's at 1 of 2 layers (test F1 0.250 vs 0.200 on average)" in page


def test_the_margins_over_each_control_are_said_in_words(tmp_path):
    """eval.json's and quality.json's margins (`--control` repeated) become one line per control: which figures the
    SAEs earn over it, where the margin is nil and where they fall behind."""
    def margin(fvu, se):
        return {"layer": 0, "sequences": 8, "fvu": fvu, "fvu_se": se, "ce_recovered": 0.0, "ce_recovered_se": 0.01,
                "ce_recovered_mean": -0.1, "ce_recovered_mean_se": 0.01}

    rows = [{"layer": 0, "fvu": 0.1, "l0": 8.0, "dead_frac": 0.0, "dense_frac": 0.0, "ce_clean": 2.0, "ce_sae": 2.1,
             "ce_zero": 5.0, "ce_recovered": 0.97, "kl": 0.01}]
    (tmp_path / "eval.json").write_text(json.dumps({"layers": rows, "control": rows, "margins": [
        {"control": "ctl/random", "kind": "random", "figures": rows, "layers": [margin(0.5, 0.01)]},
        {"control": "ctl/frozen", "kind": "frozen-decoder", "figures": rows, "layers": [margin(0.01, 0.01)]}]}))
    (tmp_path / "quality.json").write_text(json.dumps({"layers": {}, "probing": {"tasks": {}}, "margins": [
        {"control": "ctl/frozen", "kind": "frozen-decoder",
         "layers": {"0": {"top1": 0.1, "top1_se": 0.02, "top5": 0.0, "top5_se": 0.02}}}]}))
    page = build_report(tmp_path).read_text()
    assert ("over the random control (<code>ctl/random</code>): CE recovered nil at 1 layer; CE recovered vs mean below "
            "at 1 layer; FVU earned at 1 layer") in page
    assert "over the frozen-decoder control (<code>ctl/frozen</code>): CE recovered nil at 1 layer" in page
    assert "FVU nil at 1 layer" in page and "probing top-1 earned at 1 layer; probing top-5 nil at 1 layer" in page
