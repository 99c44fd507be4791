"""Steering adds exactly strength x decoder row at the layer, at every position, and nothing outside the block."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, random_saes, run_cli
from saescope.api.scope import Scope
from saescope.api.steer import feature_vector, generate, parse_features, steered_pair
from saescope.core.errors import SaescopeError
from saescope.core.models import capture, load_model


@pytest.fixture(scope="module")
def scope(tiny_qwen3):
    return Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 1, 2]))


@torch.no_grad()
def test_steering_adds_the_weighted_decoder_rows_at_every_position(scope):
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    model = scope.lm.model
    clean = capture(model, ids, [1, 2], stop_early=False)
    vec = feature_vector(scope.saes[1], {3: 8.0, 7: -4.0})
    assert torch.allclose(vec, 8 * scope.saes[1].W_dec[3] - 4 * scope.saes[1].W_dec[7])
    with scope.steer(1, {3: 8.0, 7: -4.0}):
        steered = capture(model, ids, [1, 2], stop_early=False)
    assert torch.allclose(steered[1] - clean[1], vec.expand_as(clean[1]), atol=1e-4)
    assert not torch.allclose(steered[2], clean[2], atol=1e-3)  # later layers see the change
    after = capture(model, ids, [1], stop_early=False)
    assert torch.equal(after[1], clean[1])  # the hook is gone after the block


def test_generation_changes_under_strong_steering_and_not_otherwise(scope):
    lm = scope.lm
    pair = steered_pair(lm, scope.saes[2], layer=2, features={5: 200.0}, prompt="Janet has ducks", max_new_tokens=8)
    assert pair["unsteered"] == generate(lm, "Janet has ducks", max_new_tokens=8)  # greedy and deterministic
    assert pair["steered"] != pair["unsteered"]
    zero = steered_pair(lm, scope.saes[2], layer=2, features={5: 0.0}, prompt="Janet has ducks", max_new_tokens=8)
    assert zero["steered"] == zero["unsteered"]


def test_feature_parsing_and_errors(scope):
    assert parse_features("3,7", "8") == {3: 8.0, 7: 8.0}
    assert parse_features("3,7", "8,-4") == {3: 8.0, 7: -4.0}
    with pytest.raises(SaescopeError, match="2 features but 3 strengths"):
        parse_features("3,7", "1,2,3")
    with pytest.raises(SaescopeError, match="must be integers"):
        parse_features("x", "1")
    with pytest.raises(SaescopeError, match="feature 64 is out of range"):
        feature_vector(scope.saes[0], {64: 1.0})
    with pytest.raises(SaescopeError, match="no SAE for layer 5"):
        scope.steer(5, {1: 1.0})
    with pytest.raises(SaescopeError, match="prompt is empty"):
        generate(scope.lm, "  ")


def test_steer_cli(tiny_sae_dir, tmp_path):
    code, out, err = run_cli("steer", "--sae", str(tiny_sae_dir), "--layer", "1", "--feature", "2,5", "--strength", "300,-300",
                             "--prompt", "Janet has ducks", "--max-new-tokens", "6", "--out", str(tmp_path / "s.json"))
    assert code == 0, err
    assert "unsteered:" in out and "steered:" in out and "median token norm" in out and (tmp_path / "s.json").exists()
    code, _, err = run_cli("steer", "--sae", str(tiny_sae_dir), "--layer", "9", "--feature", "2", "--strength", "3", "--prompt", "x")
    assert_one_line_error(code, err, "no SAE for layer 9 in")
    code, _, err = run_cli("steer", "--sae", str(tiny_sae_dir), "--layer", "1", "--feature", "999", "--strength", "3", "--prompt", "x")
    assert_one_line_error(code, err, "feature 999 is out of range")
