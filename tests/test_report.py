import pytest

from saescope import SaescopeError
from saescope.report import build_report


def test_empty_run_says_which_command_fills_each_section(tmp_path):
    page = build_report(tmp_path).read_text()
    for command in ("saescope train", "saescope eval", "saescope control random", "saescope stability", "saescope transfer"):
        assert command in page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_corrupt_json_and_missing_folder_are_one_clear_error(tmp_path):
    (tmp_path / "eval.json").write_text('{"layers": [')
    with pytest.raises(SaescopeError, match="eval.json: not valid JSON"):
        build_report(tmp_path)
    with pytest.raises(SaescopeError, match="run folder not found"):
        build_report(tmp_path / "nope")
