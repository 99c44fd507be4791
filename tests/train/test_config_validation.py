"""TrainConfig: every bad field refused on construction with one SaescopeError naming it; shape() from presets and
overrides; a config read back from its own JSON equals the one written (tests/train/test_trainer.py's
test_config_validation covers parse_layers and width_and_k)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saescope.core.errors import SaescopeError
from saescope.core.train import TrainConfig

DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
# Qwen-Scope's released widths (16x k50/k100 dense, 64x k100 MoE) and the two CPU-sized ones
PRESET_SHAPES = {"16x-k50": (16, 50), "16x-k100": (16, 100), "64x-k100": (64, 100), "8x-k32": (8, 32), "4x-k32": (4, 32)}


@pytest.mark.parametrize("field,value,message", [
    ("ctx_len", 1, r"ctx_len must be >= 2, got 1"),
    ("ctx_len", 0, r"ctx_len must be >= 1, got 0"),
    ("ctx_len", True, r"ctx_len must be an integer, got True"),
    ("ctx_len", 256.0, r"ctx_len must be an integer"),
    ("batch_size", 0, r"batch_size must be >= 1, got 0"),
    ("max_tokens", -5, r"max_tokens must be >= 1"),
    ("checkpoint_every", 0, r"checkpoint_every must be >= 1"),
    ("shuffle_buffer", 0, r"shuffle_buffer must be >= 1"),
    ("activation_buffer", -1, r"activation_buffer must be >= 0, got -1"),
    ("k", 0, r"^k must be >= 1, got 0"),
    ("k", 2.5, r"^k must be an integer"),
    ("expansion", 0, r"expansion must be >= 1"),
    ("seed", -1, r"seed must be >= 0"),
    ("data_seed", -1, r"data_seed must be >= 0"),
    ("lr", 0, r"^lr must be > 0, got 0"),
    ("lr", -1e-4, r"^lr must be > 0"),
    ("lr", math.nan, r"^lr must be a finite number"),
    ("lr", math.inf, r"^lr must be a finite number"),
    ("lr_decay_frac", 1.5, r"lr_decay_frac must be <= 1, got 1.5"),
    ("lr_decay_frac", -0.1, r"lr_decay_frac must be >= 0"),
    ("outlier_factor", -1, r"outlier_factor must be >= 0, got -1"),
    ("auxk_alpha", -0.5, r"auxk_alpha must be >= 0"),
    ("auxk_share", 0.0, r"auxk_share must be > 0, got 0"),
    ("auxk_share", 1.5, r"auxk_share must be <= 1, got 1.5"),
    ("model_dtype", "int4", r"model_dtype must be one of .*, got 'int4'"),
    ("sae_dtype", "fp8", r"sae_dtype must be one of .*, got 'fp8'"),
    ("preset", "3x", r"preset must be one of .*, got '3x'"),
    ("preset", "16x-K50", r"preset must be one of .*16x-k50.*, got '16x-K50'"),
    ("text_column", "", r"text_column must not be empty"),
    ("layers", "3-1", r"bad layer range '3-1'.*write it low-high, e.g. 1-3"),
    ("layers", "a,b", r"bad layer list 'a,b'"),
    ("layers", "1,,2", r"bad layer list"),
])
def test_each_bad_field_is_refused_by_name(field, value, message):
    with pytest.raises(SaescopeError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("ctx_len", 2), ("batch_size", 1), ("k", 1), ("lr", 1e-12), ("lr_decay_frac", 0.0), ("lr_decay_frac", 1.0),
    ("outlier_factor", 0.0), ("auxk_alpha", 0.0), ("seed", 0), ("data_seed", 0), ("preset", None), ("layers", "all"),
    ("layers", "0,5,10-20"), ("layers", "7-7"), ("lr", 1),  # an int where a float is expected is a number too
    ("auxk_share", 1.0), ("auxk_share", 0.01),
])
def test_edge_values_are_accepted(field, value):
    assert getattr(TrainConfig(**{field: value}), field) == value


def test_defaults_are_accepted_and_are_qwen_scope_16x_k50():
    cfg = TrainConfig()
    assert (cfg.preset, cfg.expansion, cfg.k, cfg.lr) == ("16x-k50", None, None, None)
    assert (cfg.ctx_len, cfg.batch_size, cfg.outlier_factor, cfg.lr_decay_frac) == (256, 16, 5.0, 0.2)
    assert cfg.shape() == (16, 50)
    assert cfg.width_and_k(576) == (9216, 50)


@pytest.mark.parametrize("preset,shape", sorted(PRESET_SHAPES.items()))
def test_shape_of_each_preset_and_its_overrides(preset, shape):
    assert TrainConfig(preset=preset).shape() == shape
    assert TrainConfig(preset=preset, k=7).shape() == (shape[0], 7)
    assert TrainConfig(preset=preset, expansion=3).shape() == (3, shape[1])
    assert TrainConfig(preset=preset, expansion=3, k=7).shape() == (3, 7)
    assert TrainConfig(preset=preset).width_and_k(64) == (64 * shape[0], shape[1])


def test_shape_without_preset_falls_back_to_16x_k50():
    assert TrainConfig(preset=None).shape() == (16, 50)
    assert TrainConfig(preset=None, expansion=4, k=8).shape() == (4, 8)


def _through_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))


def test_from_dict_of_to_dict_is_the_same_config():
    cfg = TrainConfig(model="m", data="d.jsonl", layers="0,2", preset=None, expansion=4, k=8, lr=3e-4, seed=5,
                      data_seed=9, extra={"note": "x"})
    back = TrainConfig.from_dict(_through_json(cfg), "config.json")
    assert back == cfg and back is not cfg
    # a file from another version may carry fields this one does not know; a missing field is refused, never defaulted
    d = _through_json(cfg)
    d["from_the_future"] = 1
    assert TrainConfig.from_dict(d) == cfg
    for field in ("auxk_alpha", "max_tokens", "lr", "data_seed"):
        short = {k: v for k, v in d.items() if k != field}
        with pytest.raises(SaescopeError, match=rf"^config\.json: field '{field}' is missing$"):
            TrainConfig.from_dict(short, "config.json")
    # ... except a field that records older than it lack, with what such a record means
    older = {k: v for k, v in d.items() if k != "activation_buffer"}
    assert TrainConfig.from_dict(older).activation_buffer == 0


@pytest.mark.parametrize("field,value,message", [
    ("ctx_len", "256", r"^runs/x/config\.json: field 'ctx_len' must be an integer, got '256'"),
    ("ctx_len", 256.0, r"^runs/x/config\.json: field 'ctx_len' must be an integer"),
    ("lr", "1e-4", r"^runs/x/config\.json: field 'lr' must be a number"),
    ("skip_first_token", 1, r"^runs/x/config\.json: field 'skip_first_token' must be true/false, got 1"),
    ("layers", [0, 1], r"^runs/x/config\.json: field 'layers' must be a string, got \[0, 1\]"),
    ("extra", [], r"^runs/x/config\.json: field 'extra' must be an object"),
    ("out", None, r"^runs/x/config\.json: field 'out' is null"),
    # the type is right, the range is not: the origin is named too
    ("ctx_len", 1, r"^runs/x/config\.json: ctx_len must be >= 2, got 1"),
    ("model_dtype", "int4", r"^runs/x/config\.json: model_dtype must be one of"),
])
def test_from_dict_refuses_naming_origin_and_field(field, value, message):
    d = _through_json(TrainConfig())
    d[field] = value
    with pytest.raises(SaescopeError, match=message):
        TrainConfig.from_dict(d, "runs/x/config.json")


@pytest.mark.parametrize("body", [[], "config", 3, None])
def test_from_dict_refuses_what_is_not_an_object(body):
    with pytest.raises(SaescopeError, match=r"^cfg\.json: expected a JSON object"):
        TrainConfig.from_dict(body, "cfg.json")


# ---- properties: every valid config survives its JSON file; every wrong-typed field is refused by name

valid_configs = st.builds(
    TrainConfig,
    model=st.none() | st.text(max_size=20),
    data=st.none() | st.text(max_size=20),
    out=st.text(min_size=1, max_size=20),
    text_column=st.text(min_size=1, max_size=10),
    layers=st.none() | st.sampled_from(["all", "0", "0,5,10-20", "3-3,1"]),
    preset=st.none() | st.sampled_from(sorted(PRESET_SHAPES)),
    expansion=st.none() | st.integers(1, 128),
    k=st.none() | st.integers(1, 512),
    ctx_len=st.integers(2, 8192),
    batch_size=st.integers(1, 1024),
    lr=st.none() | st.floats(min_value=1e-12, max_value=10, allow_nan=False),
    lr_decay_frac=st.floats(0, 1),
    auxk_alpha=st.floats(0, 10),
    outlier_factor=st.floats(0, 1000),
    model_dtype=st.sampled_from(DTYPES),
    sae_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**63),
    data_seed=st.none() | st.integers(0, 2**31),
    skip_first_token=st.booleans(),
    centre_encoder=st.booleans(),
    per_token_warmup=st.floats(0, 1),
    activation_buffer=st.integers(0, 2**20),
    arch=st.sampled_from(["topk", "batchtopk", "jumprelu", "matryoshka"]),
    extra=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs)
def test_property_json_round_trip(cfg):
    back = TrainConfig.from_dict(_through_json(cfg))
    assert back == cfg
    preset = PRESET_SHAPES.get(cfg.preset or "", (16, 50))
    assert back.shape() == (cfg.expansion or preset[0], cfg.k or preset[1])


# each field's JSON type, written out here (not read from the dataclass) so that a changed annotation shows
KINDS = {
    **dict.fromkeys(("model", "data", "out", "text_column", "layers", "preset", "model_dtype", "sae_dtype", "device",
                     "model_device_map", "decoder_init", "arch", "activations", "decoder"), str),
    **dict.fromkeys(("expansion", "k", "ctx_len", "batch_size", "max_tokens", "dead_tokens", "checkpoint_every",
                     "log_every", "seed", "data_seed", "shuffle_buffer", "activation_buffer"), int),
    **dict.fromkeys(("lr", "lr_decay_frac", "auxk_alpha", "auxk_share", "outlier_factor", "l0_coef", "per_token_warmup"),
                    float),
    **dict.fromkeys(("skip_first_token", "load_in_8bit", "centre_encoder"), bool),
    "extra": dict,
}


def test_kinds_table_covers_every_field():
    assert sorted(KINDS) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def _fits(value, kind) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(KINDS)), st.sampled_from([[1], {"a": 1}, "text", 1.5, 3, True]))
def test_property_a_wrong_type_is_refused_by_name(field, value):
    d = _through_json(TrainConfig())
    d[field] = value
    if _fits(value, KINDS[field]):
        return  # the type fits; its range is another matter (tested above)
    with pytest.raises(SaescopeError, match=rf"^origin\.json: field '{field}' must be "):
        TrainConfig.from_dict(d, "origin.json")


@pytest.mark.parametrize("max_tokens,ctx_len,batch", [
    (131_072, 256, 2),  # the demo's budget: 256 steps of 2 sequences
    (1_000_000, 256, 16),  # 1M tokens and more: the long-run batch, 244 steps
    (100_000_000, 256, 16),
    (40_000, 256, 1),  # too short for 200 steps even of one sequence: one per step
    (131_072, 64, 10),  # shorter sequences: more of them per step
])
def test_the_default_batch_follows_the_token_budget(max_tokens, ctx_len, batch):
    cfg = TrainConfig(max_tokens=max_tokens, ctx_len=ctx_len)
    assert cfg.batch_size == batch
    assert TrainConfig(max_tokens=max_tokens, ctx_len=ctx_len, batch_size=7).batch_size == 7  # asked for: kept
    # Saved resolved, so a resumed run that raises --max-tokens keeps its batch (and so its tokens per step).
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())) | {"max_tokens": 10 * max_tokens})
    assert again.batch_size == batch


def test_the_dead_latent_threshold_follows_the_budget_and_is_saved_resolved():
    from saescope.core.train.config import budget_dead_tokens

    assert budget_dead_tokens(131_072) == 2_621 and budget_dead_tokens(10) == 1
    assert budget_dead_tokens(10**12) == 10_000_000  # Gao et al.'s threshold for long runs, never more
    cfg = TrainConfig(max_tokens=1_048_576)
    assert cfg.dead_tokens == 20_971 and TrainConfig(max_tokens=1_048_576, dead_tokens=5).dead_tokens == 5
    # a run saved with its resolved threshold keeps it when resumed with more tokens
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())) | {"max_tokens": 10 * 1_048_576})
    assert again.dead_tokens == 20_971


def test_the_default_learning_rate_follows_the_number_of_steps():
    from saescope.core.train.config import budget_lr

    gao = 2e-4 / math.sqrt(4608 / 2**14)  # 3.771e-4 for 8x SmolLM2-135M's 576 dimensions
    assert budget_lr(4608, 4096) == pytest.approx(3 * gao)  # LR_SCALE: measured for this trainer's small batches
    assert budget_lr(4608, 100_000) == pytest.approx(3 * gao)  # never lowered for long runs
    assert budget_lr(4608, 1024) == pytest.approx(6 * gao)  # sqrt(4096 / 1024)
    assert budget_lr(4608, 256) == pytest.approx(12 * gao)  # sqrt(16) = 4, the cap
    assert budget_lr(4608, 1) == pytest.approx(12 * gao)
    assert budget_lr(4 * 4608, 256) == pytest.approx(6 * gao)  # Gao et al.'s 1 / sqrt(width)
    assert budget_lr(256, 8) == pytest.approx(6e-3)  # a small dictionary's short run: the ceiling, not 1.9e-2


def test_a_config_saved_before_the_activation_buffer_reads_as_without_one():
    d = _through_json(TrainConfig())
    assert d.pop("activation_buffer") == 8192
    assert TrainConfig.from_dict(d).activation_buffer == 0  # those runs trained each step on its own sequences
