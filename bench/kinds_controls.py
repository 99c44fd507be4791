"""The real-model table of issue 34: each SAE kind of bench/kinds.py's sweep (SmolLM2 layer 15, one activation cache)
beside the controls of Korznikov et al. 2026, with the trained SAEs' margins and their paired standard errors.

For each kind's run: a random control of its kind (`control random`), the run trained again with its decoder frozen at
its init (`control frozen-decoder`, from the same cache, the same tokens), then `eval` and `quality` with both controls
(`--control` twice). Resumable: finished steps are kept.

With --soft-frozen, also the soft-frozen control (the decoder held at cosine >= 0.8 to its init) and the run's margins
over it. With --peer-python, SAELens's trainer of the same kind on the same cached tokens (bench/peer_saelens_activations.py
in the peers' venv, saescope's batch, lr and token count), evaluated by the same eval and quality beside the same controls.

    SAESCOPE_SHARED_DATA=../shared/data python bench/kinds_controls.py --sweep bench/work/kinds/sweep \
        --json bench/results/kinds-controls-layer15.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from saescope.api.controls import ControlConfig, run_control
from saescope.api.evaluate import EvalConfig, run_eval
from saescope.api.quality import QualityConfig, run_quality
from saescope.core.io import read_summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="bench/work/kinds/sweep")
    p.add_argument("--arch", default="topk,batchtopk,jumprelu,matryoshka")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--json", required=True)
    p.add_argument("--soft-frozen", action="store_true", help="also the soft-frozen control and the margins over it")
    p.add_argument("--peer-python", default=None, help="the peers' venv python: SAELens trains on the same cache")
    a = p.parse_args()
    sweep = Path(a.sweep)
    out: dict = {"eval_tokens": a.eval_tokens, "kinds": {}, "seconds": {}}
    for kind in a.arch.split(","):
        run = sweep / f"{kind}-k{a.k}"
        random, frozen = sweep / f"{run.name}-random", sweep / f"{run.name}-frozen-decoder"
        if not random.is_dir():
            run_control(ControlConfig(kind="random", like=str(run), out=str(random)))
        if read_summary(frozen) is None:
            start = time.perf_counter()
            run_control(ControlConfig(kind="frozen-decoder", like=str(run), out=str(frozen)))
            out["seconds"][f"frozen-decoder {kind}"] = time.perf_counter() - start
        controls = [str(random), str(frozen)]
        figures = sweep / f"{run.name}-controls"
        if not (figures / "eval.json").is_file():
            start = time.perf_counter()
            print(run_eval(EvalConfig(sae=str(run), control=controls, n_tokens=a.eval_tokens, out=str(figures))).text())
            out["seconds"][f"eval {kind}"] = time.perf_counter() - start
        if not (figures / "quality.json").is_file():
            start = time.perf_counter()
            print(run_quality(QualityConfig(sae=str(run), control=controls, out=str(figures / "quality.json"))).text())
            out["seconds"][f"quality {kind}"] = time.perf_counter() - start
        ev = json.loads((figures / "eval.json").read_text())
        quality = json.loads((figures / "quality.json").read_text())
        out["kinds"][kind] = {"eval": {"layers": ev["layers"], "margins": ev["margins"]},
                              "quality": {"layers": quality["layers"], "margins": quality["margins"]},
                              "frozen_train_tok_s": read_summary(frozen)["tokens_per_s"],
                              "train_tok_s": read_summary(run)["tokens_per_s"]}
        if a.soft_frozen:
            out["kinds"][kind]["soft_frozen"] = soft_frozen(run, sweep, a.eval_tokens, out["seconds"])
        if a.peer_python:
            out["kinds"][kind]["saelens"] = saelens(a.peer_python, run, kind, controls, a.eval_tokens, out["seconds"])
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"written {a.json}")


def figures(sae: str, controls: list[str], folder: Path, eval_tokens: int, seconds: dict, label: str,
            model: str | None = None, k: int | None = None) -> dict:
    """eval and quality of `sae` beside `controls` into `folder` (kept when already there). `k`: for files that record
    none (SAELens saves BatchTopK as JumpReLU), the k their controls keep."""
    if not (folder / "eval.json").is_file():
        start = time.perf_counter()
        print(run_eval(EvalConfig(sae=sae, model=model, k=k, control=controls, n_tokens=eval_tokens,
                                  out=str(folder))).text())
        seconds[f"eval {label}"] = time.perf_counter() - start
    if not (folder / "quality.json").is_file():
        start = time.perf_counter()
        print(run_quality(QualityConfig(sae=sae, model=model, k=k, control=controls,
                                        out=str(folder / "quality.json"))).text())
        seconds[f"quality {label}"] = time.perf_counter() - start
    ev = json.loads((folder / "eval.json").read_text())
    quality = json.loads((folder / "quality.json").read_text())
    return {"eval": {"layers": ev["layers"], "margins": ev["margins"]},
            "quality": {"layers": quality["layers"], "margins": quality["margins"]}}


def soft_frozen(run: Path, sweep: Path, eval_tokens: int, seconds: dict) -> dict:
    control = sweep / f"{run.name}-soft-frozen"
    if read_summary(control) is None:
        start = time.perf_counter()
        run_control(ControlConfig(kind="soft-frozen", like=str(run), out=str(control)))
        seconds[f"soft-frozen {run.name}"] = time.perf_counter() - start
    return {**figures(str(run), [str(control)], sweep / f"{run.name}-soft-frozen-figures", eval_tokens, seconds,
                      f"{run.name} vs soft-frozen"),
            "train_tok_s": read_summary(control)["tokens_per_s"]}


def saelens(python: str, run: Path, kind: str, controls: list[str], eval_tokens: int, seconds: dict) -> dict:
    """SAELens's trainer of `kind` on the run's cache, at the run's width, k, batch, lr and tokens."""
    cfg = json.loads((run / "train.json").read_text())
    peer = run.parent / f"saelens-{run.name}"
    if not (peer / "timing.json").is_file():
        layer = int(cfg["layers"])
        subprocess.run([python, str(Path(__file__).with_name("peer_saelens_activations.py")),
                        "--activations", str(Path(cfg["activations"]) / f"layer{layer}"), "--arch", kind,
                        "--expansion", str(cfg["expansion"]), "--k", str(cfg["k"]), "--tokens", str(cfg["max_tokens"]),
                        "--batch", str(cfg["batch_size"] * cfg["ctx_len"]), "--lr", str(cfg["lr"]), "--out", str(peer),
                        "--hook-name", f"model.layers.{layer}", "--model-name", cfg["model"]], check=True)
    timing = json.loads((peer / "timing.json").read_text())
    seconds[f"saelens train {kind}"] = timing["seconds"]
    return {**figures(str(peer / "saelens"), controls, run.parent / f"saelens-{run.name}-controls", eval_tokens, seconds,
                      f"saelens {kind}", model=cfg["model"], k=cfg["k"]), "train_tok_s": timing["tok_s"]}


if __name__ == "__main__":
    main()
