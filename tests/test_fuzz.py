"""Fuzz: corrupted and ill-typed versions of every file saescope reads, and random flag values, through the real
command line (in process, so that a case costs milliseconds, not an interpreter start). Every case is invalid by
construction and must end in exit status 2 with one `saescope: error:` line, no traceback (the suite runs with
SAESCOPE_DEBUG=1: an unexpected exception fails the case with its traceback), and every file that existed before
byte-identical after.

The default budget is about 200 cases (well under two minutes on 2 cores); `make fuzz` multiplies it
(SAESCOPE_FUZZ_SCALE) and draws new cases each run (SAESCOPE_FUZZ_RANDOM=1)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_saes, run_cli
from saescope import cli
from saescope.core.io import export_saes
from saescope.core.train import TrainConfig
from saescope.core.train.config import RECORD_MIGRATIONS

SCALE = float(os.environ.get("SAESCOPE_FUZZ_SCALE", "1"))
COUNTS: dict[str, int] = {}


def fuzz(examples: int):
    """Hypothesis settings for one family: `examples` cases times the scale; derandomized unless `make fuzz`."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("SAESCOPE_FUZZ_RANDOM", "") in ("", "0"),
                    suppress_health_check=list(HealthCheck))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def workspace(*sources: Path):
    """A fresh folder with copies of `sources` (by name) for one case."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        for src in sources:
            (shutil.copytree if src.is_dir() else shutil.copy)(src, root / src.name)
        yield root


def refused(argv: list[str], root: Path, family: str) -> str:
    """Run the command line on a case that must be refused; check the contract; return the error line."""
    before = tree_hashes(root)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith("saescope: error:")]
    assert code == 2, f"{argv}: exit {code}, expected 2\n{text}{out.getvalue()}"
    assert len(lines) == 1 and "Traceback" not in text, f"{argv}: expected one error line\n{text}"
    # the CLI's guard words an exception no check foresaw as "unexpected": a crash it hides, not a refusal
    assert "unexpected" not in lines[0], f"{argv}: a crash, not a refusal\n{text}"
    after = tree_hashes(root)
    assert {k: after.get(k) for k in before} == before, f"{argv}: a file that existed before was changed"
    COUNTS[family] = COUNTS.get(family, 0) + 1
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if COUNTS:
        print("\nfuzz cases by family: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
              + f"; {sum(COUNTS.values())} in all")


# ---------------------------------------------------------------- values that are wrong for a field
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def not_a(kind: type, *, low: int | None = None) -> st.SearchStrategy:
    """JSON values that are not a valid `kind` (for ints: none at or above `low`)."""
    def wrong(v: object) -> bool:
        if kind is int:
            return not (isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low))
        if kind is float:
            return not (isinstance(v, (int, float)) and not isinstance(v, bool) and (low is None or v >= low))
        return not isinstance(v, kind)
    return JSON_VALUES.filter(wrong)


# ---------------------------------------------------------------- family 1: SAE folders of each format
@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sae-formats")
    saes = random_saes(8, [0, 1], d_sae=16, k=4, model="tiny")
    folders = {}
    for fmt in ("saescope", "saelens", "qwen-scope"):
        folders[fmt] = root / fmt
        export_saes(saes, folders[fmt], fmt, model_name="tiny")
    (folders["qwen-scope"]).rename(root / "qs-L0_4")
    folders["qwen-scope"] = root / "qs-L0_4"
    sparsify = root / "sparsify" / "layers.0"
    sparsify.mkdir(parents=True)
    from safetensors.torch import save_file

    sae = saes[0]
    save_file({"encoder.weight": sae.W_enc.detach().clone(), "encoder.bias": sae.b_enc.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": torch.zeros(8)}, str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4, "expansion_factor": 2}))
    folders["sparsify"] = root / "sparsify"
    from saescope.core.sae import SAEConfig, make_sae

    jumprelu = {}
    for n in (0, 1):
        jumprelu[n] = make_sae(SAEConfig(8, 16, 4, kind="jumprelu"))
        jumprelu[n].init_tied(torch.Generator().manual_seed(n))
        jumprelu[n].meta = {"model": "tiny"}
    folders["saescope-jumprelu"] = root / "saescope-jumprelu"
    export_saes(jumprelu, folders["saescope-jumprelu"], "saescope")
    gemma = root / "gemma-scope" / "layer_0" / "width_16" / "average_l0_4"
    gemma.mkdir(parents=True)
    import numpy as np

    np.savez(gemma / "params.npz", W_enc=sae.W_enc.detach().T.numpy(), W_dec=sae.W_dec.detach().numpy(),
             b_enc=sae.b_enc.detach().numpy(), b_dec=sae.b_dec.detach().numpy(), threshold=np.full(16, 0.1, np.float32))
    folders["gemma-scope"] = root / "gemma-scope"
    return folders


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(field: str, value: object) -> Callable[[dict], object]:
    return lambda cfg: {**cfg, field: value}


def _drop(field: str) -> Callable[[dict], object]:
    return lambda cfg: {k: v for k, v in cfg.items() if k != field}


def _damage_bytes(data: bytes, how: str, cut: float, noise: bytes) -> bytes:
    if how == "truncate":
        return data[: int(len(data) * cut)]
    if how == "empty":
        return b""
    return noise  # random bytes in place of the file


damage = st.tuples(st.sampled_from(["truncate", "empty", "noise"]), st.floats(0, 0.95), st.binary(min_size=0, max_size=200))

SAE_CASES = st.one_of(
    # saescope: layer config
    st.tuples(st.just("saescope"), st.just("layer1.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        not_a(int, low=1).filter(lambda v: v is None or not isinstance(v, int) or v < 1).map(lambda v: ("k", v)),
        st.integers(17, 10**9).map(lambda v: ("k", v)),  # k > d_sae
        st.just(("drop", "k")),
        st.one_of(not_a(int, low=0), st.integers(2, 10**6)).map(lambda v: ("format_version", v)),
        st.one_of(not_a(int, low=1), st.integers(1, 10**6).filter(lambda v: v != 8)).map(lambda v: ("d_model", v)),
    )),
    # saescope: weights
    st.tuples(st.just("saescope"), st.just("layer0.safetensors"), damage.map(lambda d: ("bytes", d))),
    st.tuples(st.just("saescope"), st.just("layer0.safetensors"), st.sampled_from(["nan", "inf", "-inf"]).map(lambda v: ("poison", v))),
    st.tuples(st.just("saescope"), st.just("layer0.json"), st.just(("delete", None))),
    # SAELens
    st.tuples(st.just("saelens"), st.just("layer0/cfg.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        st.one_of(st.text(max_size=8).filter(lambda v: v not in ("topk", "standard")), not_a(str)).map(lambda v: ("architecture", v)),
        st.one_of(st.integers(max_value=0), st.integers(17, 10**6), st.text(min_size=1, max_size=6), st.floats(0.1, 3.9)).map(
            lambda v: ("k", v)),
        st.text(min_size=1, max_size=8).filter(lambda v: v != "none").map(lambda v: ("normalize_activations", v)),
    )),
    st.tuples(st.just("saelens"), st.just("layer1/sae_weights.safetensors"), damage.map(lambda d: ("bytes", d))),
    # sparsify
    st.tuples(st.just("sparsify"), st.just("layers.0/cfg.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)), not_a(int, low=1).map(lambda v: ("k", v)), st.just(("drop", "k")))),
    st.tuples(st.just("sparsify"), st.just("layers.0/sae.safetensors"), damage.map(lambda d: ("bytes", d))),
    # saescope JumpReLU: its threshold
    st.tuples(st.just("saescope-jumprelu"), st.just("layer0.safetensors"), st.one_of(
        st.sampled_from(["nan", "inf", "negative", "short", "drop"]).map(lambda v: ("threshold", v)),
        damage.map(lambda d: ("bytes", d)))),
    st.tuples(st.just("saescope-jumprelu"), st.just("layer1.json"), st.one_of(
        st.one_of(not_a(str), st.text(max_size=8).filter(lambda v: v not in ("jumprelu",))).map(lambda v: ("kind", v)),
        st.just(("drop", "kind")))),
    # Gemma Scope params.npz
    st.tuples(st.just("gemma-scope"), st.just("layer_0/width_16/average_l0_4/params.npz"), st.one_of(
        damage.map(lambda d: ("bytes", d)),
        st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]).map(lambda v: ("npz-drop", v)),
        st.tuples(st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]),
                  st.sampled_from(["int", "shape", "nan", "negative"])).map(lambda v: ("npz-bad", v)))),
    # Qwen-Scope
    st.tuples(st.just("qwen-scope"), st.just("layer1.sae.pt"), st.one_of(
        damage.map(lambda d: ("bytes", d)),
        st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec"]).map(lambda v: ("torch-drop", v)),
        st.tuples(st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec"]), st.sampled_from(["list", "string", "shape", "nan"])).map(
            lambda v: ("torch-bad", v)),
    )),
)


def _apply(folder: Path, member: str, change: tuple) -> None:
    path = folder / member
    how, value = change
    if how == "replace":
        path.write_text(json.dumps(value))
    elif how == "drop":
        _edit_json(path, _drop(value))
    elif how == "delete":
        path.unlink()
    elif how == "bytes":
        path.write_bytes(_damage_bytes(path.read_bytes(), *value))
    elif how == "poison":
        from safetensors.torch import load_file, save_file

        t = load_file(str(path))
        t["W_dec"][3, 2] = float(value)
        save_file(t, str(path))
    elif how == "threshold":
        from safetensors.torch import load_file, save_file

        t = load_file(str(path))
        if value == "drop":
            del t["threshold"]
        elif value == "short":
            t["threshold"] = t["threshold"][:-1].contiguous()
        else:
            t["threshold"][2] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[value]
        save_file(t, str(path))
    elif how in ("npz-drop", "npz-bad"):
        import numpy as np

        arrays = dict(np.load(path))
        if how == "npz-drop":
            del arrays[value]
        else:
            name, bad = value
            arrays[name] = {"int": arrays[name].astype(np.int64), "shape": arrays[name][..., :1],
                            "nan": np.full_like(arrays[name], np.nan),
                            "negative": np.full_like(arrays[name], -1.0) if name == "threshold" else arrays[name][..., :1]}[bad]
        np.savez(path, **arrays)
    elif how in ("torch-drop", "torch-bad"):
        state = torch.load(path, weights_only=True)
        if how == "torch-drop":
            del state[value]
        else:
            name, bad = value
            state[name] = {"list": state[name].tolist(), "string": "weights", "shape": state[name][..., :1],
                           "nan": state[name].fill_(float("nan"))}[bad]
        torch.save(state, path)
    else:
        _edit_json(path, _set(how, value))


@fuzz(60)
@given(case=SAE_CASES)
def test_fuzz_sae_folders(sae_folders, case):
    fmt, member, change = case
    with workspace(sae_folders[fmt]) as root:
        folder = root / sae_folders[fmt].name
        _apply(folder, member, change)
        refused(["export", "--sae", str(folder), "--to", "saescope", "--out", str(root / "exported")], root, f"sae-{fmt}")
        assert not (root / "exported").exists()


def test_stray_files_beside_saes_are_ignored(sae_folders, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(sae_folders["saescope"], folder)
    (folder / "layer_backup.safetensors").write_bytes(b"junk")
    (folder / "layer1.json.bak").write_text("[]")
    assert cli.main(["export", "--sae", str(folder), "--to", "saescope", "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x").glob("*.safetensors")) == ["layer0.safetensors", "layer1.safetensors"]


# ---------------------------------------------------------------- family 2: checkpoints, training state, train.json
@pytest.fixture(scope="module")
def tiny_run(tiny_qwen3, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    code, _, err = run_cli("train", "--model", str(tiny_qwen3), "--data", str(text_file), "--out", str(out), "--layers", "0,2",
                           "--preset", "4x-k32", "--ctx-len", "32", "--batch-size", "2", "--checkpoint-every", "2",
                           "--max-tokens", str(32 * 2 * 4))
    assert code == 0, err
    return out


def _wrong_for(field_name: str) -> st.SearchStrategy:
    """JSON values no TrainConfig field of that name accepts."""
    import typing

    hint = typing.get_type_hints(TrainConfig)[field_name]
    args = set(typing.get_args(hint)) or {hint}
    if str in args:
        wrong = JSON_VALUES.filter(lambda v: not isinstance(v, str) and not (v is None and type(None) in args))
        if field_name == "preset":
            wrong = st.one_of(wrong, st.text(min_size=1, max_size=8).filter(lambda v: v not in ("16x-k50", "16x-k100", "64x-k100",
                                                                                                   "8x-k32", "4x-k32")))
        return wrong
    if bool in args:
        return JSON_VALUES.filter(lambda v: not isinstance(v, bool))
    if dict in args:
        return JSON_VALUES.filter(lambda v: not isinstance(v, dict))
    numeric = int if int in args else float
    # every numeric field of TrainConfig is >= 0, so negative values are wrong whatever the field
    return st.one_of(not_a(numeric).filter(lambda v: not (v is None and type(None) in args)),
                     st.integers(-10**6, -1), st.floats(-1e6, -1e-3))


TRAIN_FIELDS = [f for f in TrainConfig.__dataclass_fields__ if f != "extra"]
STATE_KEYS = ["step", "batches_done", "tokens", "rng", "layers"]
LAYER_KEYS = ["opt", "since_fired", "medians", "n_medians", "seen", "dropped", "nonfinite"]

RUN_CASES = st.one_of(
    st.sampled_from(TRAIN_FIELDS).flatmap(lambda f: _wrong_for(f).map(lambda v: ("train.json", f, v))),
    # a field added after train.json was first written is read as what its absence meant (RECORD_MIGRATIONS)
    st.sampled_from([f for f in TRAIN_FIELDS if f not in RECORD_MIGRATIONS]).map(lambda f: ("train.json-drop", f, None)),
    not_a(dict).map(lambda v: ("train.json", None, v)),
    st.sampled_from(STATE_KEYS).map(lambda k: ("state-drop", k, None)),
    st.tuples(st.sampled_from(STATE_KEYS), st.sampled_from(["string", "list", "negative"])).map(lambda t: ("state-bad", *t)),
    st.tuples(st.sampled_from([0, 2]), st.sampled_from(LAYER_KEYS)).map(lambda t: ("layer-drop", *t)),
    st.tuples(st.sampled_from([0, 2]), st.sampled_from(LAYER_KEYS), st.sampled_from(["string", "negative", "shape"])).map(
        lambda t: ("layer-bad", t[0], t[1:])),
    damage.map(lambda d: ("state-bytes", None, d)),
    st.text(max_size=40).filter(lambda s: s.strip() not in ("checkpoints/step-00000004", "checkpoints/step-00000002")).map(
        lambda s: ("latest", None, s)),
)


def _bad_value(value: object, how: str) -> object:
    if how == "string":
        return "oops"
    if how == "list":
        return [1, 2]
    if how == "shape" and isinstance(value, torch.Tensor):
        return value[:1]
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        return -1
    return -1 if isinstance(value, int) else "negative"


@fuzz(45)
@given(case=RUN_CASES)
def test_fuzz_resume_inputs(tiny_run, case):
    kind, key, value = case
    with workspace(tiny_run) as root:
        run = root / "run"
        state_path = run / (run / "latest").read_text().strip() / "state-rank0.pt"
        if kind == "train.json":
            _edit_json(run / "train.json", (lambda cfg: value) if key is None else _set(key, value))
        elif kind == "train.json-drop":  # a missing field is refused, never defaulted (max_tokens would become 1M)
            _edit_json(run / "train.json", _drop(key))
        elif kind == "latest":
            (run / "latest").write_text(value)
        elif kind == "state-bytes":
            state_path.write_bytes(_damage_bytes(state_path.read_bytes(), *value))
        else:
            state = torch.load(state_path, weights_only=True)
            if kind == "state-drop":
                del state[key]
            elif kind == "state-bad":
                state[key[0] if isinstance(key, tuple) else key] = _bad_value(state[key], value)
            elif kind == "layer-drop":
                del state["layers"][key][value]
            else:
                name, how = value
                state["layers"][key][name] = _bad_value(state["layers"][key][name], how)
            torch.save(state, state_path)
        refused(["train", "--out", str(run), "--resume", "--max-tokens", str(32 * 2 * 8)], root, "resume")


# ---------------------------------------------------------------- family 3: data files of each kind
def _data_case(kind: str, noise: bytes, value: object) -> tuple[str, bytes]:
    if kind == "jsonl-scalar":
        return ".jsonl", (json.dumps(value) + "\n").encode()
    if kind == "jsonl-binary":
        return ".jsonl", b'{"text": "fine"}\n' + b"\xff\xfe" + noise + b"\n"
    if kind == "json-not-rows":
        return ".json", json.dumps(value).encode()
    if kind == "csv-binary":
        return ".csv", b"text\nfine\n\xff\xfe" + noise
    if kind == "parquet-noise":
        return ".parquet", noise
    if kind == "gz-noise":
        return ".jsonl.gz", noise
    if kind == "gz-truncated":
        raw = gzip.compress(b"".join(json.dumps({"text": f"a document of some words {i}"}).encode() + b"\n" for i in range(200)))
        return ".jsonl.gz", raw[: max(1, len(raw) // 2)]
    raise AssertionError(kind)


DATA_CASES = st.tuples(
    st.sampled_from(["jsonl-scalar", "jsonl-binary", "json-not-rows", "csv-binary", "parquet-noise", "gz-noise", "gz-truncated"]),
    st.binary(min_size=0, max_size=64),
    st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)).filter(lambda v: not isinstance(v, dict)),
)


@fuzz(28)
@given(case=DATA_CASES)
def test_fuzz_training_data_files(tiny_qwen3, case):
    suffix, content = _data_case(*case)
    with workspace() as root:
        data = root / f"data{suffix}"
        data.write_bytes(content)
        refused(["train", "--model", str(tiny_qwen3), "--data", str(data), "--out", str(root / "out"), "--layers", "0",
                 "--preset", "4x-k32", "--ctx-len", "16", "--batch-size", "1", "--max-tokens", "64"], root, "data")


# ---------------------------------------------------------------- family 3b: activation caches and files
@pytest.fixture(scope="module")
def activation_cache(tiny_qwen3, text_file, tmp_path_factory) -> Path:
    from saescope.core.activation_cache import CacheConfig, run_cache

    out = tmp_path_factory.mktemp("activations") / "cache"
    run_cache(CacheConfig(model=str(tiny_qwen3), data=str(text_file), out=str(out), layers="0,1", max_tokens=200, ctx_len=16,
                          batch_size=4, shard_tokens=64, model_dtype="fp32"))
    return out


CACHE_FIELDS = {"tokens": int, "layers": list, "dtype": str, "shards": list, "model": str, "d_model": int,
                "format_version": int, "skip_first_token": bool, "ctx_len": int}
ACTIVATION_CASES = st.one_of(
    st.tuples(st.just("cache.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        st.sampled_from(sorted(CACHE_FIELDS)).map(lambda f: ("drop", f)),
        st.sampled_from(sorted(CACHE_FIELDS)).flatmap(lambda f: not_a(CACHE_FIELDS[f], low=1).map(lambda v: (f, v))),
        st.sampled_from([("tokens", 199), ("tokens", 10**6), ("format_version", 99), ("dtype", "int8"), ("format", "other"),
                         ("layers", [0, -1]), ("layers", []), ("shards", [{"name": "x", "tokens": 0}]),
                         ("shards", [{"name": "shard-000009.safetensors", "tokens": 200}])]))),
    st.tuples(st.just("layer1/shard-000001.safetensors"), damage.map(lambda d: ("bytes", d))),
    st.tuples(st.sampled_from(["acts.npy", "acts.safetensors"]), st.one_of(
        damage.map(lambda d: ("file-bytes", d)),
        st.sampled_from(["rank1", "rank3", "int", "empty", "name"]).map(lambda v: ("file", v)))),
)


def _activation_file(path: Path, change: tuple) -> None:
    import numpy as np
    from safetensors.torch import save_file

    how, value = change
    good = torch.randn(40, 64)
    if how == "file-bytes":
        if path.suffix == ".npy":
            np.save(path, good.numpy())
        else:
            save_file({"activations": good}, str(path))
        path.write_bytes(_damage_bytes(path.read_bytes(), *value))
        return
    arr = {"rank1": good[0], "rank3": good[None], "int": good.long(), "empty": good[:0], "name": good}[value]
    if path.suffix == ".npy":
        np.save(path, arr.numpy() if value != "name" else arr.numpy().astype(np.float64))
    else:
        save_file({"acts" if value == "name" else "activations": arr.contiguous()}, str(path))


@fuzz(30)
@given(case=ACTIVATION_CASES)
def test_fuzz_activation_caches_and_files(activation_cache, case):
    member, change = case
    with workspace(activation_cache) as root:
        if member.startswith("acts."):
            source = root / member
            _activation_file(source, change)
        else:
            source = root / "cache"
            _apply(source, member, change)
        refused(["train", "--activations", str(source), "--out", str(root / "out"), "--preset", "4x-k32", "--ctx-len", "16",
                 "--batch-size", "1", "--max-tokens", "64"], root, "activations")
        assert not (root / "out").exists()


# ---------------------------------------------------------------- family 4: flags
TRAIN_COUNTS = ["--batch-size", "--max-tokens", "--k", "--expansion", "--checkpoint-every", "--dead-tokens", "--ctx-len"]


def _flag_cases() -> st.SearchStrategy:
    not_positive = st.one_of(st.integers(-10**9, 0).map(str), st.sampled_from(["nan", "abc", "1.5", ""]))
    not_finite = st.sampled_from(["nan", "inf", "-inf", "NaN", "x"])
    bad_layers = st.one_of(st.sampled_from(["3-1", "a", "1,,x", "-1", "1-", "--2", "5-2,1"]),
                           st.text(alphabet="0123456789,-x ", min_size=1, max_size=8).filter(_bad_layer_spec))
    sae = "{sae}"
    return st.one_of(
        st.tuples(st.just(["eval", "--sae", sae]), st.sampled_from(["--n-tokens", "--ctx-len", "--k"]), not_positive),
        st.tuples(st.just(["eval", "--sae", sae]), st.just("--outlier-factor"), st.one_of(not_finite, st.floats(-1e6, -1e-6).map(str))),
        st.tuples(st.just(["eval", "--sae", sae]), st.just("--layers"), bad_layers),
        st.tuples(st.just(["train", "--out", "{root}/t"]), st.sampled_from(TRAIN_COUNTS), not_positive),
        st.tuples(st.just(["train", "--out", "{root}/t"]), st.just("--lr"), st.one_of(not_finite, st.floats(-1e3, 0).map(str))),
        st.tuples(st.just(["train", "--out", "{root}/t"]), st.just("--lr-decay-frac"),
                  st.one_of(not_finite, st.floats(1.0001, 1e6).map(str), st.floats(-1e6, -1e-6).map(str))),
        st.tuples(st.just(["train", "--out", "{root}/t"]), st.just("--layers"), bad_layers),
        st.tuples(st.just(["inspect", "--sae", sae, "--texts", "hello there"]), st.sampled_from(["--max-length", "--top", "--limit"]),
                  not_positive),
        st.tuples(st.just(["steer", "--sae", sae, "--layer", "0", "--feature", "1", "--prompt", "Hi"]), st.just("--strength"),
                  not_finite),
        st.tuples(st.just(["steer", "--sae", sae, "--layer", "0", "--feature", "1", "--prompt", "Hi"]),
                  st.sampled_from(["--max-new-tokens"]), not_positive),
        st.tuples(st.just(["redundancy", "report", "{root}"]), st.sampled_from(["--repeats", "--matched-repeats"]), not_positive),
        st.tuples(st.just(["redundancy", "report", "{root}"]), st.just("--subsume"),
                  st.one_of(not_finite, st.floats(1.0001, 1e6).map(str), st.floats(-1e6, -1e-6).map(str))),
        st.tuples(st.just(["control", "random", "--like", sae, "--out", "{root}/c"]), st.just("--variance"),
                  st.one_of(not_finite, st.floats(1.0001, 1e6).map(str), st.floats(-1e6, 0).map(str))),
        st.tuples(st.just(["plan", "--model", "Qwen/Qwen3-8B"]), st.sampled_from(["--tokens-per-step"]), not_positive),
    )


def _bad_layer_spec(spec: str) -> bool:
    from saescope.core.errors import SaescopeError
    from saescope.core.train import parse_layers

    try:
        parse_layers(spec, None)
    except SaescopeError:
        return True
    return False


@fuzz(60)
@given(case=_flag_cases())
def test_fuzz_flags(sae_folders, case):
    prefix, flag, value = case
    with workspace(sae_folders["saescope"]) as root:
        argv = [a.format(sae=root / "saescope", root=root) for a in prefix] + [f"{flag}={value}"]
        refused(argv, root, "flags")
        assert not (root / "t").exists() and not (root / "c").exists()


# ---------------------------------------------------------------- family 5: footprint folders, redundancy.json, score tables
BENCHES = ("gsm8k", "math", "arc_challenge", "mmlu")


@pytest.fixture(scope="module")
def footprint_folder(tmp_path_factory) -> Path:
    import numpy as np

    from saescope.apps.redundancy.analysis import analyse
    from saescope.apps.redundancy.footprint import FORMAT, Footprints, write_sets
    from saescope.apps.redundancy.metrics import FeatureSets
    from saescope.core.files import atomic_write_json

    path = tmp_path_factory.mktemp("fp") / "fp"
    rng = np.random.default_rng(0)
    for name in BENCHES:
        rows = [np.sort(rng.choice(32, 4, replace=False)) for _ in range(10)]
        write_sets(path / "sae" / f"{name}.safetensors", {3: FeatureSets.from_lists(rows, 32)})
    (path / "footprints.json").write_text(json.dumps({
        "format": FORMAT, "version": 1, "sae": "x", "model": "m", "pool": "last", "layers": [3], "d_sae": 32, "k": 4,
        "max_length": 512, "control": None, "benchmarks": {b: {"n": 10, "source": "hand", "hash": "0"} for b in BENCHES}}))
    atomic_write_json(path / "redundancy.json", analyse(Footprints.load(path), repeats=3, matched_repeats=2, progress=False))
    lines = ["model,gsm8k,math,arc_challenge,mmlu"] + [f"m{i},{rng.random():.3f},{rng.random():.3f},{rng.random():.3f},{rng.random():.3f}"
                                                      for i in range(6)]
    (path.parent / "scores.csv").write_text("\n".join(lines) + "\n")
    # the correctness source compare always reads: a small per-item matrix of our own, not the shared data
    items = ["model", *(f"q{i}" for i in range(6))]
    (path.parent / "perf.csv").write_text("\n".join([",".join(items)] + [",".join([f"m{i}", *(str(rng.integers(0, 2)) for _ in range(6))])
                                                                      for i in range(5)]) + "\n")
    return path


def _score_table(kind: str, words: list[str], values: list) -> str:
    if kind == "no-model-column":
        return ",".join(words or ["x"]) + "\n" + ",".join("1" for _ in words or ["x"]) + "\n"
    if kind == "empty":
        return ""
    if kind == "text-scores":  # a benchmark column holding words
        return "model,gsm8k,math\n" + "".join(f"m{i},{w},0.5\n" for i, w in enumerate(words or ["abc"]))
    if kind == "no-matching-column":
        return "model," + ",".join(f"zz{w}" for w in words or ["x"]) + "\n" + "m0," + ",".join("0.5" for _ in words or ["x"]) + "\n"
    raise AssertionError(kind)


FP_CASES = st.one_of(
    st.tuples(st.just("footprints.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        st.sampled_from(["layers", "d_sae", "benchmarks", "k"]).map(lambda f: ("drop", f)),
        not_a(list).map(lambda v: ("layers", v)), not_a(int, low=1).map(lambda v: ("d_sae", v)),
        not_a(dict).map(lambda v: ("benchmarks", v)))),
    st.tuples(st.just("sae/math.safetensors"), st.one_of(damage.map(lambda d: ("bytes", d)), st.just(("delete", None)))),
    st.tuples(st.just("redundancy.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        st.sampled_from(["layer", "benchmarks", "sets"]).map(lambda f: ("drop", f)),
        not_a(dict).map(lambda v: ("sets", v)), not_a(list).map(lambda v: ("benchmarks", v)),
        damage.map(lambda d: ("bytes", d)))),
    st.tuples(st.just("../scores.csv"), st.tuples(
        st.sampled_from(["no-model-column", "empty", "text-scores", "no-matching-column"]),
        st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6).filter(lambda w: w != "model"),
                 max_size=4, unique=True),
        st.just([])).map(lambda t: ("text", _score_table(*t)))),
)


@fuzz(40)
@given(case=FP_CASES)
def test_fuzz_footprints_and_scores(footprint_folder, case):
    member, (how, value) = case
    with workspace(footprint_folder, footprint_folder.parent / "scores.csv", footprint_folder.parent / "perf.csv") as root:
        fp = root / "fp"
        if how == "text":
            (fp / member).write_text(value)
        else:
            _apply(fp, member, (how, value))
        if member.startswith(("footprints", "sae/")):
            refused(["redundancy", "report", str(fp), "--repeats", "2", "--matched-repeats", "2"], root, "footprints")
        else:
            refused(["redundancy", "compare", str(fp), "--scores", str(root / "scores.csv"), "--perf", str(root / "perf.csv"),
                     "--repeats", "2", "--n-perm", "20"], root, "redundancy-json+scores")


# ---------------------------------------------------------------- family 6: feature stores
@pytest.fixture(scope="module")
def feature_store(tmp_path_factory) -> Path:
    from dataclasses import asdict

    from saescope.api.store import FORMAT, HIST_EDGES, VERSION, LayerStats, StoreConfig

    path = tmp_path_factory.mktemp("store") / "fs"
    cfg = StoreConfig(top_n=3, left=2, right=1, logit_k=2)
    stats = LayerStats(8, cfg, torch.device("cpu"))
    stats.t["fire_count"][3] = 5
    ids, vals = torch.zeros(8, 2, dtype=torch.int32), torch.ones(8, 2)
    stats.t.update(logit_top_ids=ids, logit_top_vals=vals, logit_bottom_ids=ids.clone(), logit_bottom_vals=-vals)
    path.mkdir()
    (path / "layer0.safetensors").write_bytes(stats.to_bytes())
    (path / "tokens.json").write_text('{"0": "the"}')
    (path / "store.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "sae": "s", "model": "m", "layers": [0], "fingerprints": {}, "d_sae": {"0": 8},
        "config": asdict(cfg), "hist_edges": HIST_EDGES, "moe": None, "batches": 1, "tokens": 100, "counted_tokens": {"0": 90},
        "build": {"seconds": 1.0, "peak_rss_mb": 100, "device": "cpu"}}))
    assert cli.main(["features", "show", "--store", str(path), "--layer", "0", "--feature", "3"]) == 0
    return path


STORE_CASES = st.one_of(
    st.tuples(st.just("store.json"), st.one_of(
        not_a(dict).map(lambda v: ("replace", v)),
        st.sampled_from(["layers", "d_sae", "config", "hist_edges", "counted_tokens"]).map(lambda f: ("drop", f)),
        not_a(list).map(lambda v: ("layers", v)), not_a(dict).map(lambda v: ("d_sae", v)),
        not_a(dict).map(lambda v: ("config", v)), damage.map(lambda d: ("bytes", d)))),
    st.tuples(st.just("tokens.json"), st.one_of(not_a(dict).map(lambda v: ("replace", v)), damage.map(lambda d: ("bytes", d)))),
    st.tuples(st.just("layer0.safetensors"), st.one_of(damage.map(lambda d: ("bytes", d)), st.just(("delete", None)))),
)


@fuzz(30)
@given(case=STORE_CASES, feature=st.integers(0, 7))
def test_fuzz_feature_stores(feature_store, case, feature):
    member, change = case
    with workspace(feature_store) as root:
        _apply(root / "fs", member, change)
        refused(["features", "show", "--store", str(root / "fs"), "--layer", "0", "--feature", str(feature)], root, "store")


@fuzz(10)
@given(feature=st.one_of(st.integers(8, 10**9), st.integers(-10**9, -1)), layer=st.integers(-5, 5).filter(lambda n: n != 0))
def test_fuzz_feature_store_lookups(feature_store, feature, layer):
    with workspace(feature_store) as root:
        refused(["features", "show", "--store", str(root / "fs"), "--layer", "0", "--feature", str(feature)], root, "store")
        refused(["features", "show", "--store", str(root / "fs"), "--layer", str(layer), "--feature", "3"], root, "store")


# ---------------------------------------------------------------- family: records that name SAEs (rules, targets)
@pytest.fixture(scope="module")
def rules_case(tmp_path_factory) -> Path:
    """An SAE folder (d_sae 16, its model a name no loader knows: a refusal must come before any model loads) and a
    rules file mined on it."""
    from saescope.api.rules import Rule, RuleFeature, RuleSet
    from saescope.core.io import fingerprint

    root = tmp_path_factory.mktemp("records")
    saes = random_saes(8, [0, 1], d_sae=16, k=4, model="no-such-model")
    export_saes(saes, root / "saes", "saescope")
    mining = {"source": "x", "language": "", "hash": "h", "n_texts": 4, "n_positive": 2, "n_negative": 2, "data": "x.csv",
              "columns": {}, "split": "mine", "fraction": 1.0, "seed": 0, "data_hash": "h"}
    choice = {"layer_best_delta": {"0": 0.5}, "chosen_layer": 0, "mining_f1": {}, "mining_balanced_accuracy": {}}
    rule = Rule("layer0-k1", "layer", 1, (RuleFeature(0, 3, 0.5, 0.6, 0.1),))
    RuleSet([rule], "layer0-k1", 0.0, "no-such-model", str(root / "saes"), {0: fingerprint(saes[0])}, mining, choice,
            False, {0: 16}).save(root / "rules.json")
    return root


RECORD_CASES = [  # (what is done to the records, the command, a fragment of its one-line refusal)
    ("feature 999999, width recorded", "classify", "feature 999999 is out of range"),
    ("feature 16 (= d_sae), width recorded", "classify", "feature 16 is out of range"),
    ("feature 999999, version 1", "classify", "feature 999999 of layer 0 is out of range"),
    ("feature 16 (= d_sae), version 1", "eval", "feature 16 of layer 0 is out of range"),
    ("layer 7, not among the SAEs", "classify", "layer 7"),
    ("other model", "classify", "were mined on model other-model, not no-such-model"),
    ("sae path relative to the rules", "classify", "no-such-model"),
    ("mining record without its seed", "eval", "mining: field 'seed' is missing"),
    ("target 16 (= d_sae)", "coverage", "feature id out of range"),
]


@pytest.mark.parametrize("change,command,fragment", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_records_are_checked_against_the_saes_they_name(rules_case, change, command, fragment):
    with workspace(rules_case / "saes", rules_case / "rules.json") as root:
        rules = root / "rules.json"
        doc = json.loads(rules.read_text())
        doc["sae"] = "./saes"  # the copy's SAEs, named relative to the rules file
        feature = doc["rules"][0]["features"][0]
        if change.startswith("feature"):
            feature["feature"] = 999999 if "999999" in change else 16
            if "version 1" in change:
                doc["version"] = 1
                doc["sae"] = str(root / "saes")
                del doc["d_sae"]
        elif change.startswith("layer 7"):
            feature["layer"] = 7
            doc["fingerprints"]["7"] = "x"
        elif change == "other model":
            doc["model"] = "other-model"
        elif change.startswith("mining"):
            del doc["mining"]["seed"]
        rules.write_text(json.dumps(doc))
        audit = root / "audit.jsonl"
        if command == "classify":
            argv = ["toxicity", "classify", "--rules", str(rules), "--texts", "hello", "--audit", str(audit)]
        elif command == "eval":
            argv = ["toxicity", "eval", "--rules", str(rules), "--json", str(root / "eval.json")]
        else:
            (root / "texts.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
            argv = ["coverage", "--sae", str(root / "saes"), "--targets", "0:16", "--data", str(root / "texts.jsonl"), "--json",
                    str(root / "cov.json")]
        cwd = os.getcwd()
        os.chdir(tempfile.gettempdir())  # the rules are read from another folder than the one they were written in
        try:
            line = refused(argv, root, "records")
        finally:
            os.chdir(cwd)
        assert fragment in line, line
        assert not audit.exists() and not audit.with_name("audit.jsonl.partial").exists()
