"""`saescope train | plan | models`: training runs, their resource plans, and the built-in models and corpus."""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import replace
from pathlib import Path

from saescope.cli.flags import add_config_flags, config_from_flags, int_list, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir
from saescope.core.train import PRESETS, TrainConfig

# Flags a resumed run may change: how long it goes on and how it is run, not what it trains.
RESUME_MAY_CHANGE = {"max_tokens", "checkpoint_every", "log_every", "device", "model_device_map"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one top-k SAE per decoder layer")
    add_config_flags(p, TrainConfig, skip=("out",))
    writes(p, "--out", folder=True, default=TrainConfig.out, help="the run folder")
    p.add_argument("--seeds", type=int, default=1,
                   help="train N SAE sets with seeds seed..seed+N-1 on the same data (OUT/seed-i) and compare them")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--distributed", choices=["dp", "layers"], help="under torchrun: split data (dp) or layers")
    p.add_argument("--eval-tokens", type=int, default=0, help="evaluate on this many held-out tokens afterwards")

    p = sub.add_parser("plan", help="memory and time estimates for training all layers of a model")
    p.add_argument("--model", required=True, help="hub id (Qwen3-8B, Qwen3-1.7B, Qwen3-30B-A3B known offline), folder or built-in")
    p.add_argument("--preset", default=TrainConfig.preset, choices=sorted(PRESETS))
    p.add_argument("--expansion", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--gpus", type=int_list, default=[1, 8], help="GPU counts to plan for, e.g. 1,8")
    p.add_argument("--mode", default="layers", choices=["layers", "dp"])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default: measured here with an encoder-shaped matmul)")
    writes(p, "--json", folder=False, help="the plans as JSON")

    sub.add_parser("models", help="built-in models, the default corpus, and where they are cached")


def cmd_train(a: argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not a.distributed:
        raise SaescopeError("launched by torchrun with several processes: pass --distributed dp or --distributed layers")
    if a.seeds == 1:
        _train_one(a, _config(a, RunDir(a.out)))
        return
    if a.distributed:
        raise SaescopeError("--seeds trains the runs one after the other in one process; leave out --distributed")
    from saescope.apps.trust import format_stability
    from saescope.apps.trust.seeds import seed_configs, train_seeds

    configs = [_config(a, RunDir(c.out), seed=c.seed, data_seed=c.data_seed)
               for c in seed_configs(config_from_flags(TrainConfig, a), a.seeds)]
    results = train_seeds(configs, resume=a.resume, on_trained=lambda trainer, summary: _after_training(a, trainer, summary))
    for r in results.values():
        print(format_stability(r["layers"], r["control"]))
        print(f"stability results: {r['path']}")


def _config(a: argparse.Namespace, run: RunDir, *, seed: int | None = None, data_seed: int | None = None) -> TrainConfig:
    """The run's config: from the flags for a new run, from the run folder (with what may change) for --resume."""
    seed = a.seed if seed is None else seed
    data_seed = a.data_seed if data_seed is None else data_seed
    if a.resume:
        return _resumed_config(a, run, getattr(a, "given", set()), seed, data_seed)
    if run.has_run():
        raise SaescopeError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    return config_from_flags(TrainConfig, a, out=str(run.path), seed=seed, data_seed=data_seed)


def _resumed_config(a: argparse.Namespace, run: RunDir, given: set[str], seed: int, data_seed: int | None) -> TrainConfig:
    """The config of the run in RUN, as saved, with the flags a resumed run may change applied. The folder is the
    one given: a `out` recorded inside (a moved or copied run) never sends reads or writes elsewhere."""
    from saescope.core.files import read_json

    if run.latest_name() is None:
        if run.train_config.exists():
            raise SaescopeError(f"--resume: {run.path} holds train.json but no `latest` checkpoint pointer; restore it "
                                "(checkpoints/step-NNNNNNNN) or choose another --out")
        raise SaescopeError(f"--resume: {run.path} holds no run (it stopped before its first checkpoint, if it ran); "
                            "leave out --resume to start it")
    if not run.train_config.is_file():
        raise SaescopeError(f"--resume: {run.train_config} is missing, so the run's settings are unknown")
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
        if name == "model_dtype" and asked.model_dtype == "auto":  # the run recorded what its `auto` resolved to
            asked.model_dtype = saved.model_dtype
            continue
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


def _train_one(a: argparse.Namespace, cfg: TrainConfig) -> None:
    from saescope.core.train import Trainer

    trainer = Trainer(cfg, distributed=a.distributed)
    if a.resume and trainer.load_checkpoint():
        print(f"resuming {cfg.out} at step {trainer.step} ({trainer.tokens} tokens)", flush=True)
    summary = trainer.fit()
    if trainer.dist.rank == 0:
        _after_training(a, trainer, summary)


def _after_training(a: argparse.Namespace, trainer, summary: dict) -> None:
    """What the command prints after a run, and the evaluation --eval-tokens asks for."""
    cfg = trainer.cfg
    print(f"trained {len(trainer.layers)} SAEs (d_sae {trainer.d_sae}, k {trainer.k}) on {summary['tokens']} tokens "
          f"in {summary['elapsed_s']:.0f}s ({summary['tokens_per_s']:.0f} tok/s, LM in {summary['model_dtype']}); SAEs in {cfg.out}")
    dropped = {n: v["dropped"] for n, v in summary["layers"].items()}
    print("outlier filter dropped tokens per layer: " + ", ".join(f"{n}:{d}" for n, d in dropped.items()))
    if a.eval_tokens > 0:
        from saescope.cli.eval import evaluate_and_print

        evaluate_and_print(trainer.lm, {n: st.sae for n, st in trainer.states.items()}, RunDir(cfg.out).eval,
                           data=cfg.data, text_column=cfg.text_column, n_tokens=a.eval_tokens, ctx_len=cfg.ctx_len,
                           outlier_factor=cfg.outlier_factor)


def cmd_plan(a: argparse.Namespace) -> None:
    from saescope.core.files import atomic_write_json
    from saescope.core.train.plan import format_plan, make_plan, plan_dict

    expansion, k = PRESETS[a.preset]
    plans = [make_plan(a.model, expansion=a.expansion or expansion, k=a.k or k, gpus=g, mode=a.mode,
                       tokens_per_step=a.tokens_per_step, tflops=a.tflops) for g in a.gpus]
    for p in plans:
        print(format_plan(p))
    if a.json:
        atomic_write_json(Path(a.json), [plan_dict(p) for p in plans])


def cmd_models(_a: argparse.Namespace) -> None:
    from saescope.core.cache import cache_dir
    from saescope.core.models import BUILTIN_MODELS

    print(f"cache: {cache_dir()}  (set SAESCOPE_CACHE to move it)")
    for name, spec in BUILTIN_MODELS.items():
        folder = cache_dir() / "models" / name
        state = str(folder) if (folder / "config.json").exists() else "not fetched yet"
        print(f"  {name:24} {state}\n  {'':24} {spec.description}")
    from saescope.core.data.corpus import MIX_SHARES, mix_file

    corpus = mix_file()
    mix = ", ".join(f"{name} {share:.0%}" for name, share in MIX_SHARES.items())
    print(f"default corpus: {corpus if corpus.exists() else 'not built yet'} ({mix}; saescope.core.data.corpus)")


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "models": cmd_models}
