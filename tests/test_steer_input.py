"""steer's input is checked before a model is loaded: NaN or infinite strengths, repeated or negative feature ids,
out-of-range decoding settings and empty prompts are one-line errors, and a refused run writes nothing."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli
from saescope.api.steer import generate, parse_features
from saescope.core.errors import SaescopeError


@pytest.mark.parametrize("features,strengths,fragment", [
    ("3", "nan", "strength must be a finite number, got nan"),
    ("3,7", "8,inf", "strength must be a finite number, got inf"),
    ("3", "-inf", "strength must be a finite number, got -inf"),
    ("-1", "2", "feature must be >= 0, got -1"),
    ("3,3", "8,-4", "feature 3,3: feature 3 is given twice"),
])
def test_bad_features_and_strengths(features, strengths, fragment):
    with pytest.raises(SaescopeError, match=fragment):
        parse_features(features, strengths)


@pytest.mark.parametrize("kw,fragment", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": -1.0}, "temperature must be >= 0, got -1"),
])
def test_generate_refuses_bad_settings_before_using_the_model(kw, fragment):
    with pytest.raises(SaescopeError, match=fragment):
        generate(None, "a prompt", **kw)  # the checks come first: no model is needed to reach them


def test_steer_cli_refuses_nan_and_keeps_earlier_results(tmp_path):
    out = tmp_path / "s.json"
    out.write_text('{"earlier": true}')
    # The SAE folder does not exist: the strength is refused before anything is loaded.
    code, _, err = run_cli("steer", "--sae", str(tmp_path / "nosae"), "--layer", "1", "--feature", "2", "--strength", "nan",
                           "--prompt", "x", "--out", str(out))
    assert_one_line_error(code, err, "strength must be a finite number, got nan")
    code, _, err = run_cli("steer", "--sae", str(tmp_path / "nosae"), "--layer", "1", "--feature", "2", "--strength", "3",
                           "--prompt", "x", "--prompt", " ", "--out", str(out))
    assert_one_line_error(code, err, "--prompt 2 is empty")
    assert out.read_text() == '{"earlier": true}'
