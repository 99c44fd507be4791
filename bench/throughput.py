"""All-layer SAE training throughput: saescope vs the hardware limit vs eai-sparsify, in one run.

    python bench/throughput.py                       # SmolLM2, 30 layers, 16x-k50, 40 steps of 8 x 128 tokens
    python bench/throughput.py --peers ''            # saescope and the limit only
    python bench/throughput.py --peers sparsify,sae-lens   # both peers (sae-lens: one layer per run, counted per layer)
    python bench/throughput.py --sweep               # also: width 4x/16x/64x and 1/10/30 layers
    python bench/throughput.py --from-cache DIR      # also: training from an activation cache (saescope cache), against
                                                     # the SAE-only limit (the cached layers' encoder products)

The limit is 1 / (t_LM_forward + sum over layers of t_encoder_matmul) per token, each timed alone
with the same dtype and threads (the irreducible work of streaming top-k SAE training). The LM
forward is timed as the trainer runs it: stopped after the last hooked layer. FVU of every trainer's
final SAEs is measured by the same code on the same held-out tokens (norm-outlier tokens excluded,
as saescope's filter does; the unfiltered FVU is printed beside it). Peers run in their own venv
(--peer-python) and never become dependencies. Prints one table; writes JSON beside it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saescope.core.activation_cache import read_cache_info
from saescope.core.data import batches, iter_texts
from saescope.core.io import load_saes
from saescope.core.models import capture, load_model
from saescope.core.models.builtin import builtin_model_dir
from saescope.core.sae.fast import screens, top_k
from saescope.core.system import cpu_flags, peak_rss_mb
from saescope.core.train import PRESETS, TrainConfig, Trainer, parse_layers, resolve_device, resolve_dtype
from saescope.core.train.config import buffer_steps
from saescope.core.train.trainer import STEP_PARTS

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps=5) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _scratch() -> Path:
    """A temporary folder removed at exit: every trainer writes GBs of checkpoints (3.6 GB for 30 layers at 16x)."""
    path = Path(tempfile.mkdtemp(prefix="saescope-bench-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def token_batches(tokenizer, ctx_len, batch_size, n, split="train"):
    out = []
    for b in batches(iter_texts(None, split=split), tokenizer, ctx_len=ctx_len, batch_size=batch_size, seed=0):
        out.append(b)
        if len(out) == n:
            break
    return out


def measure_limit(lm, layers, d_sae, batch, device) -> dict:
    """The limit in the fastest dtype the hardware offers, not the trainer's own choice: the LM forward and the
    encoder product are each timed in fp32 and in bf16, and the faster counts. The LM in the dtype the trainer does
    not use is loaded for the timing only (held through a run, it would count in the trainer's peak memory)."""
    other = torch.bfloat16 if lm.dtype == torch.float32 else torch.float32
    lms = {lm.dtype: lm, other: load_model(lm.name, dtype=other, device=str(device))}
    ids = batch.to(device)
    t_lm = {dt: _timed(lambda lm=lm: capture(lm.model, ids, layers), device) for dt, lm in lms.items()}
    acts = capture(next(iter(lms.values())).model, ids, layers)
    x32 = acts[layers[len(layers) // 2]].reshape(-1, next(iter(lms.values())).d_model).float()
    t_enc = {}
    for dt in lms:
        x = x32.to(dt)
        W = torch.randn(d_sae, x.shape[1], device=device, dtype=dt) / x.shape[1] ** 0.5
        # The bare product into a buffer already in memory: no bias, no fresh (tokens x d_sae) allocation
        # (on CPU a fresh one page-faults ~10 ms per layer at 1,024 tokens), so the strictest limit.
        pre = torch.empty(x.shape[0], d_sae, device=device, dtype=dt)
        t_enc[dt] = _timed(lambda x=x, W=W, pre=pre: torch.mm(x, W.T, out=pre), device)
    pre = F.linear(x32, torch.randn(d_sae, x32.shape[1], device=device) / x32.shape[1] ** 0.5)
    t_topk = _timed(lambda: pre.topk(50, dim=-1, sorted=False), device)
    t_top_k = _timed(lambda: top_k(pre, 50), device)
    n_tok = ids.numel()
    lm_dt, enc_dt = min(t_lm, key=t_lm.get), min(t_enc, key=t_enc.get)
    return {"t_lm_s": t_lm[lm_dt], "t_enc_per_layer_s": t_enc[enc_dt], "t_topk_per_layer_s": t_topk, "t_top_k_per_layer_s": t_top_k,
            "limit_tok_s": n_tok / (t_lm[lm_dt] + len(layers) * t_enc[enc_dt]), "lm_only_tok_s": n_tok / t_lm[lm_dt],
            "n_layers": len(layers), "n_tokens": n_tok, "lm_dtype": str(lm_dt), "enc_dtype": str(enc_dt),
            "t_lm_by_dtype_s": {str(d): t for d, t in t_lm.items()}, "t_enc_by_dtype_s": {str(d): t for d, t in t_enc.items()}}


def optimizer_floor(n_layers: int, d_model: int, d_sae: int, device) -> dict:
    """What Adam's memory traffic alone costs a step: each fp32 parameter is read with its gradient and two moments and
    written back with both moments (7 x 4 bytes), at this machine's copy bandwidth (a 256 MB copy, read + write, timed).
    The limit leaves the optimizer out; at a small step it can cost more than the limit allows."""
    n = 64 * 2**20
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    src.fill_(1.0)
    dst.copy_(src)
    t = _timed(lambda: dst.copy_(src), device)
    bandwidth = 2 * 4 * n / t  # bytes per second, read + write
    params = n_layers * (2 * d_sae * d_model + d_sae + d_model)
    traffic = 7 * 4 * params
    return {"bandwidth_gb_s": bandwidth / 1e9, "adam_bytes_per_step": traffic, "t_adam_min_s": traffic / bandwidth}


def _mean_limit(limits: list[dict]) -> dict:
    """The limit from the mean of several timings of its parts."""
    mean = {key: statistics.mean(lim[key] for lim in limits) for key in limits[0] if key.startswith("t_") and isinstance(limits[0][key], float)}
    n_tok, n_layers = limits[0]["n_tokens"], limits[0]["n_layers"]
    return {**mean, "n_tokens": n_tok, "n_layers": n_layers, "lm_only_tok_s": n_tok / mean["t_lm_s"],
            "limit_tok_s": n_tok / (mean["t_lm_s"] + n_layers * mean["t_enc_per_layer_s"])}


def fvu_on(saes, eval_acts, factor=5.0) -> tuple[float, float]:
    """Mean over layers of FVU on held-out tokens: (outlier tokens excluded, all tokens)."""
    kept, full = [], []
    for n, sae in saes.items():
        x = eval_acts[n].reshape(-1, eval_acts[n].shape[-1]).float()
        sae = sae.to(x.device)
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x))
        norms = x.norm(dim=1)
        keep = norms <= factor * norms.median()
        for store, mask in ((kept, keep), (full, torch.ones_like(keep))):
            xs, xh = x[mask], x_hat[mask]
            store.append(float((xs - xh).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()))
    return statistics.mean(kept), statistics.mean(full)


def timed_span(n_steps: int, warmup: int, window: int) -> tuple[int, int]:
    """The steps [first, last) to time: whole windows of the activation buffer only. The trainer runs the LM for a
    window's batches at the window's first step and trains the window's steps after it, so a span that cut a window
    would count its SAE steps without their LM forwards (or the reverse). The windows holding the first `warmup`
    steps are left out."""
    first = window * math.ceil(warmup / window)
    last = first + window * ((n_steps - first) // window)
    if last <= first:
        raise SystemExit(f"{n_steps} steps leave no whole window of {window} steps after the warm-up's {first}: "
                         f"ask for at least --steps {first + window}")
    return first, last


def saescope_config(args, layers, expansion, k, out: Path, max_tokens: int, activations: str | None = None) -> TrainConfig:
    """The config every saescope run of the bench trains with (timed or profiled, from the LM or from `activations`):
    the bench's arguments, a step's log each step, no checkpoint before the end."""
    return TrainConfig(model=args.model, out=str(out), layers=",".join(map(str, layers)), preset=None, expansion=expansion,
                       activations=activations,
                       k=k, ctx_len=args.ctx_len, batch_size=args.batch_size, max_tokens=max_tokens, checkpoint_every=10**9,
                       log_every=1, model_dtype=args.model_dtype, sae_dtype=args.sae_dtype, device=args.device,
                       dead_tokens=args.dead_tokens, outlier_factor=args.outlier_factor)


def run_saescope(lm, args, layers, expansion, k, steps, out: Path, activations: str | None = None) -> dict:
    """A timed saescope run: from the LM, or from the activation cache `activations` (then `lm` is unused and every
    step is its own window: no LM forward to keep whole)."""
    cfg = saescope_config(args, layers, expansion, k, out, args.ctx_len * args.batch_size * steps, activations)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, lm=None if activations else lm)
    trainer.fit()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the SAEs stay in memory
    window = 1 if activations else buffer_steps(cfg.activation_buffer, cfg.ctx_len * cfg.batch_size)
    first, last = timed_span(len(log), args.warmup, window)
    secs = log[last - 1]["elapsed_s"] - (log[first - 1]["elapsed_s"] if first > 0 else 0.0)
    tokens = (last - first) * cfg.ctx_len * cfg.batch_size
    return {"tok_s": tokens / secs, "steps": log[-1]["step"], "timed_steps": last - first,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "saes": {n: st.sae for n, st in trainer.states.items()}}


def _run_peer(args, script: str, options: list[str], train_batches, out: Path) -> dict:
    """Run a peer script in the peers' venv on the benchmark's tokens; its timing.json, with warm-up steps cut."""
    out.mkdir(parents=True, exist_ok=True)
    tokens_file = out / "tokens.pt"
    torch.save(torch.cat(train_batches), tokens_file)
    cmd = [args.peer_python, str(ROOT / "bench" / script), "--tokens", str(tokens_file), "--batch-size", str(args.batch_size),
           "--model-dtype", args.model_dtype_peer, "--threads", str(torch.get_num_threads()),
           "--device", str(resolve_device(args.device)), "--out", str(out), *options]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{script} failed:\n{r.stderr[-3000:]}")
    timing = json.loads((out / "timing.json").read_text())
    timing["warmup"] = min(args.warmup, len(timing["step_end_times"]) - 1)
    return timing


def run_sparsify(args, model_dir, layers, expansion, k, train_batches, out: Path) -> dict:
    timing = _run_peer(args, "peer_sparsify.py", ["--model-dir", str(model_dir), "--layers", ",".join(map(str, layers)),
                                                  "--expansion", str(expansion), "--k", str(k),
                                                  "--optimizer", args.sparsify_optimizer], train_batches, out)
    ends, w = timing["step_end_times"], timing["warmup"]
    tok_s = (len(ends) - w) * args.ctx_len * args.batch_size / (ends[-1] - (ends[w - 1] if w > 0 else 0))
    return {"tok_s": tok_s, "steps": len(ends), "peak_rss_mb": timing["peak_rss_mb"], "peak_gpu_mb": timing["peak_gpu_mb"],
            "saes": load_saes(out / "sparsify")}


def run_saelens(args, lm, model_dir, layers, expansion, k, train_batches, out: Path, device) -> dict:
    """sae-lens trains one hook point per run: train the middle layer, then count an all-layer job as one run per
    layer: sum over layers of (LM forward stopped after that layer) + layers x the SAE's own step time."""
    from saescope.core.sae import default_lr

    layer = layers[len(layers) // 2]
    timing = _run_peer(args, "peer_saelens.py", ["--model-dir", str(model_dir), "--layer", str(layer), "--expansion",
                                                 str(expansion), "--k", str(k), "--lr", str(default_lr(expansion * lm.d_model))],
                       train_batches, out)
    ends, w = timing["step_end_times"], timing["warmup"]
    t_step = statistics.median(b - a for a, b in zip(ends[w:], ends[w + 1 :]))
    ids = train_batches[0].to(device)
    t_lm = {n: _timed(lambda n=n: capture(lm.model, ids, [n]), device, reps=1) for n in layers}
    t_sae = max(t_step - t_lm[layer], 1e-9)
    per_step = args.batch_size * args.ctx_len
    return {"tok_s": per_step / (sum(t_lm.values()) + len(layers) * t_sae), "one_layer_tok_s": per_step / t_step,
            "layer": layer, "t_step_s": t_step, "t_sae_step_s": t_sae, "steps": len(ends), "peak_rss_mb": timing["peak_rss_mb"],
            "peak_gpu_mb": timing["peak_gpu_mb"], "saes": {layer: next(iter(load_saes(out / "saelens").values()))}}


def profile_parts(args, lm, layers, expansion, k, work: Path, device, steps: int = 4) -> dict:
    """Where a saescope step's time goes: `steps` steps of a run under torch.profiler (after 2 unprofiled ones of
    another, which warm the process, and the run's own first activation-buffer window, whose first step sets up
    Adam's state: zeroing both moments of every weight matrix cost ~570 ms per profiled step on a 2-core EPYC), whole
    windows only, so that each LM forward profiled feeds profiled steps; each part of the trainer's step
    (trainer.STEP_PARTS, its profiler scopes) summed over layers, in ms per step and as a share of the step's wall
    time; what no scope covers is "other". Also prints the top operators."""
    def trainer(name: str) -> Trainer:
        out = Trainer(saescope_config(args, layers, expansion, k, work / name, 10**9), lm=lm)
        out.save_checkpoint = lambda: out.out  # keep checkpoint I/O out of the profiled steps
        return out

    warm = trainer("profile-warmup")
    warm.fit(stop_after_steps=2)  # the process warm (allocator, kernels) before the profiled run
    del warm  # 30 layers of 16x SAEs with their Adam state are ~5 GB: one run held at a time
    profiled = trainer("profile")
    cfg = profiled.cfg
    window = buffer_steps(cfg.activation_buffer, cfg.ctx_len * cfg.batch_size)
    steps = window * math.ceil(steps / window)
    acts_list = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # One run, whose first window is left out by the profiler's schedule (a second `fit` on the same folder is refused
    # by the run lock): the schedule steps once per trained step.
    with torch.profiler.profile(activities=acts_list, schedule=torch.profiler.schedule(wait=window, warmup=0, active=steps)) as prof:
        train_step = profiled._train_step

        def step_and_tick(xs):
            train_step(xs)
            prof.step()

        profiled._train_step = step_and_tick
        profiled.fit(stop_after_steps=window + steps)
    # the profiled steps' wall time from the run's own log (one record per step)
    at = {r["step"]: r["elapsed_s"] for r in map(json.loads, profiled.run.train_log.read_text().splitlines())}
    wall = at[window + steps] - at[window]
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    totals = {e.key.removeprefix("saescope."): e.cpu_time_total / 1e3 / steps for e in prof.key_averages()
              if e.key.startswith("saescope.")}  # (CPU time: on GPU the parts' kernels run after their scopes)
    parts = {name: totals.get(name, 0.0) for name in STEP_PARTS}
    step_ms = wall * 1e3 / steps
    parts["other"] = max(0.0, step_ms - sum(parts.values()))
    tokens = args.batch_size * args.ctx_len
    return {"steps": steps, "tokens_per_step": tokens, "step_ms": step_ms, "tok_s_profiled": tokens / (step_ms / 1e3),
            "ms_per_step": parts,
            "share": {name: ms / step_ms for name, ms in parts.items()}}


def format_profile(profile: dict) -> str:
    lines = [f"per part of a step ({profile['steps']} profiled steps of {profile['tokens_per_step']} tokens, "
             f"{profile['step_ms']:.0f} ms each under the profiler):"]
    lines += [f"  {name:<13} {ms:9.1f} ms {profile['share'][name]:6.1%}" for name, ms in profile["ms_per_step"].items() if ms]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights (GPU hosts without the weights)")
    p.add_argument("--layers", default="all")
    p.add_argument("--preset", default="16x-k50", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dead-tokens", type=int, default=None, help="default: train's (a fiftieth of the tokens)")
    p.add_argument("--outlier-factor", type=float, default=5.0, help="saescope's norm-outlier filter (0 = off, as sparsify)")
    p.add_argument("--model-dtype", default="auto")
    p.add_argument("--sae-dtype", default="auto")
    p.add_argument("--model-dtype-peer", default=None, help="default: the same as saescope's")
    p.add_argument("--device", default="auto")
    p.add_argument("--peers", default="sparsify", help="comma list of sparsify, sae-lens ('' = none)")
    p.add_argument("--peer-python", default=os.environ.get("SAESCOPE_PEER_PYTHON", str(ROOT.parent / "peers-venv" / "bin" / "python")))
    p.add_argument("--sparsify-optimizer", default="adam")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="run saescope and sparsify this many times each, alternately (median)")
    p.add_argument("--profile", action="store_true", help="where 4 saescope steps' time goes: per part of the step and "
                   "the top operators (torch.profiler)")
    p.add_argument("--from-cache", default=None, help="also train from this activation cache (its layers) and compare with "
                   "the SAE-only limit: the cached layers' encoder products")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    model_dtype = resolve_dtype(args.model_dtype, device)
    compute_dtype = resolve_dtype(args.sae_dtype, device)
    args.model_dtype_peer = args.model_dtype_peer or ("bf16" if model_dtype == torch.bfloat16 else "fp32")
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_dir = Path(args.model) if Path(args.model).exists() else builtin_model_dir(args.model)
        torch.manual_seed(0)
        rnd = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=model_dtype)
        work = _scratch()
        rnd.save_pretrained(work)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(work)
        args.model, model_dir = str(work), work
    else:
        model_dir = Path(args.model) if Path(args.model).exists() else builtin_model_dir(args.model)
    lm = load_model(args.model, dtype=model_dtype, device=str(device))
    layers = parse_layers(None if args.layers == "all" else args.layers, lm.n_layers)
    expansion, k = PRESETS[args.preset]
    d_sae = expansion * lm.d_model
    train_batches = token_batches(lm.tokenizer, args.ctx_len, args.batch_size, args.steps)
    eval_ids = torch.cat(token_batches(lm.tokenizer, args.ctx_len, 8, 2, split="eval")).to(device)
    eval_acts = capture(lm.model, eval_ids, layers)
    eval_acts = {n: a.float() for n, a in eval_acts.items()}

    work = _scratch()
    # The machine's speed drifts (a shared VM: the same LM forward took 0.9-1.8 s between hours), so the limit
    # is timed right before and right after saescope's run and averaged, and --rounds repeats saescope and
    # sparsify back to back, comparing each pair.
    limits = [measure_limit(lm, layers, d_sae, train_batches[0], device)]
    ours = run_saescope(lm, args, layers, expansion, k, args.steps, work / "saescope")
    limits.append(measure_limit(lm, layers, d_sae, train_batches[0], device))
    rows = [{"trainer": "saescope", **{k2: v for k2, v in ours.items() if k2 != "saes"}, "fvu": fvu_on(ours["saes"], eval_acts)}]
    ours_layer = {}  # of saescope's SAEs, only what a peer's row compares with is kept (all 30 with Adam: ~5 GB)
    if "sae-lens" in args.peers.split(","):
        ours_layer = {n: ours["saes"][n] for n in layers[len(layers) // 2: len(layers) // 2 + 1]}
    del ours["saes"]
    for peer in filter(None, args.peers.split(",")):
        if peer == "sparsify":
            res = run_sparsify(args, model_dir, layers, expansion, k, train_batches, work / "sparsify")
            rows.append({"trainer": f"sparsify ({args.sparsify_optimizer})", **{k2: v for k2, v in res.items() if k2 != "saes"},
                         "fvu": fvu_on(res["saes"], eval_acts)})
        elif peer == "sae-lens":
            res = run_saelens(args, lm, model_dir, layers, expansion, k, train_batches, work / "saelens", device)
            n = res["layer"]
            # FVU of one layer: sae-lens' and saescope's SAEs of that layer on the same held-out tokens
            rows.append({"trainer": f"sae-lens (L{n})", **{k2: v for k2, v in res.items() if k2 != "saes"},
                         "fvu": fvu_on({n: res["saes"][n]}, {n: eval_acts[n]}),
                         "fvu_saescope_same_layer": fvu_on({n: ours_layer[n]}, {n: eval_acts[n]})})
        else:
            raise SystemExit(f"unknown peer {peer}; use sparsify and/or sae-lens")
    cached = None
    if args.from_cache:  # the SAE-only part: no LM forward, the limit is the cached layers' encoder products
        cache_layers = read_cache_info(Path(args.from_cache))["layers"]
        res = run_saescope(lm, args, cache_layers, expansion, k, args.steps, work / "saescope-cache", args.from_cache)
        t_enc = statistics.mean(lim["t_enc_per_layer_s"] for lim in limits)
        limit_sae = args.batch_size * args.ctx_len / (len(cache_layers) * t_enc)
        cached = {"trainer": f"saescope, from cache ({len(cache_layers)} layer{'s' if len(cache_layers) > 1 else ''})",
                  "layers": cache_layers, "tok_s": res["tok_s"], "sae_only_limit_tok_s": limit_sae,
                  "ratio_to_sae_only_limit": res["tok_s"] / limit_sae, "timed_steps": res["timed_steps"],
                  "fvu": fvu_on(res["saes"], {n: eval_acts[n] for n in cache_layers})}
    profile = profile_parts(args, lm, layers, expansion, k, work, device) if args.profile else None
    rounds = [{"saescope": ours["tok_s"], "limit": _mean_limit(limits[-2:])["limit_tok_s"],
               **{r["trainer"]: r["tok_s"] for r in rows[1:] if r["trainer"].startswith("sparsify")}}]
    for i in range(1, args.rounds):
        before = measure_limit(lm, layers, d_sae, train_batches[0], device)
        again = run_saescope(lm, args, layers, expansion, k, args.steps, work / f"saescope-{i}")
        limits += [before, measure_limit(lm, layers, d_sae, train_batches[0], device)]
        rounds.append({"saescope": again["tok_s"], "limit": _mean_limit(limits[-2:])["limit_tok_s"]})
        if "sparsify" in args.peers.split(","):
            name = f"sparsify ({args.sparsify_optimizer})"
            rounds[-1][name] = run_sparsify(args, model_dir, layers, expansion, k, train_batches, work / f"sparsify-{i}")["tok_s"]
    for r in rows:  # several rounds: each trainer's median (sae-lens runs once)
        runs = [rd[r["trainer"]] for rd in rounds if r["trainer"] in rd]
        if runs:
            r["tok_s_rounds"], r["tok_s"] = runs, statistics.median(runs)
    limit = _mean_limit(limits)
    floor = optimizer_floor(len(layers), lm.d_model, d_sae, device)
    t_limit = args.batch_size * args.ctx_len / limit["limit_tok_s"]
    floor["ceiling_share"] = t_limit / (t_limit + floor["t_adam_min_s"])  # the best share a step that also pays Adam can reach
    sweep = []
    if args.sweep:
        for exp, n_layers in [(4, 10), (16, 10), (64, 10), (16, 1), (16, len(layers))]:
            sub = layers[:: max(1, len(layers) // n_layers)][:n_layers]
            before = measure_limit(lm, sub, exp * lm.d_model, train_batches[0], device)
            res = run_saescope(lm, args, sub, exp, k, min(args.steps, 24), work / f"sweep-{exp}-{n_layers}")
            lim = _mean_limit([before, measure_limit(lm, sub, exp * lm.d_model, train_batches[0], device)])
            sweep.append({"expansion": exp, "layers": n_layers, "tok_s": res["tok_s"], "limit_tok_s": lim["limit_tok_s"],
                          "ratio": res["tok_s"] / lim["limit_tok_s"]})

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    machine = {"device": gpu or f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "model_dtype": str(model_dtype), "sae_dtype": str(compute_dtype),
               "sae_encoder": "bf16 screen + fp32 ranking" if screens(device, compute_dtype) else f"{compute_dtype} matmul",
               "cpu_flags": " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags().split()),
               "date": time.strftime("%Y-%m-%d")}
    config = {"model": "random-weights " + str(model_dir) if args.random_weights else args.model, "layers": len(layers),
              "preset": args.preset, "d_sae": d_sae, "k": k, "batch": f"{args.batch_size} x {args.ctx_len}",
              "steps": args.steps, "warmup_steps_excluded": args.warmup,
              "timed": "whole activation-buffer windows after the warm-up (a row's timed_steps)"}
    print(f"\n{machine['device']} [{machine['cpu_flags']}], torch {machine['torch']}, model {model_dtype}, "
          f"SAE encoder {machine['sae_encoder']}")
    print(f"{config['model']}: {len(layers)} layers, {args.preset} (d_sae {d_sae}), {args.steps} steps of {config['batch']} tokens")
    print("limit timed " + ", ".join(f"{lim['limit_tok_s']:.0f}" for lim in limits) + " tok/s around saescope's runs; mean:")
    print(f"limit: LM forward {limit['t_lm_s'] * 1e3:.1f} ms + {len(layers)} x encoder {limit['t_enc_per_layer_s'] * 1e3:.2f} ms "
          f"per batch -> {limit['limit_tok_s']:.0f} tok/s (LM alone {limit['lm_only_tok_s']:.0f}; "
          f"top-k per layer {limit['t_topk_per_layer_s'] * 1e3:.2f} ms torch.topk, {limit['t_top_k_per_layer_s'] * 1e3:.2f} ms saescope)")
    print(f"the limit's dtypes, the faster of fp32 and bf16 timed: LM {limits[0]['lm_dtype']}, encoder {limits[0]['enc_dtype']}")
    print(f"{'trainer':<18} {'tok/s':>8} {'of limit':>9} {'vs sparsify':>11} {'FVU':>7} {'FVU all':>8} {'peak MB':>9}")
    peer = next((r for r in rows if r["trainer"].startswith("sparsify")), None)
    for r in rows:
        r["ratio_to_limit"] = r["tok_s"] / limit["limit_tok_s"]
        r["ratio_to_sparsify"] = r["tok_s"] / peer["tok_s"] if peer else None
        mem = r["peak_gpu_mb"] if r["peak_gpu_mb"] else r["peak_rss_mb"]
        vs = f"{r['ratio_to_sparsify']:.2f}x" if peer else "-"
        print(f"{r['trainer']:<18} {r['tok_s']:8.0f} {r['ratio_to_limit']:8.0%} {vs:>11} {r['fvu'][0]:7.4f} {r['fvu'][1]:8.4f} {mem:9.0f}")
    for r in rows:
        if "fvu_saescope_same_layer" in r:
            print(f"{r['trainer']}: one run trains layer {r['layer']} at {r['one_layer_tok_s']:.0f} tok/s; the row counts one such run "
                  f"per layer; FVU at layer {r['layer']}: sae-lens {r['fvu'][0]:.4f} / saescope {r['fvu_saescope_same_layer'][0]:.4f} "
                  f"(all tokens: {r['fvu'][1]:.4f} / {r['fvu_saescope_same_layer'][1]:.4f})")
    if len(rounds) > 1:
        for i, rd in enumerate(rounds):
            sp = next((v for key, v in rd.items() if key.startswith("sparsify")), None)
            print(f"round {i + 1}: saescope {rd['saescope']:.0f} tok/s ({rd['saescope'] / rd['limit']:.0%} of the limit timed around it)"
                  + (f", sparsify {sp:.0f} tok/s, ratio {rd['saescope'] / sp:.2f}x" if sp else ""))
    for s in sweep:
        print(f"sweep: {s['expansion']:>2}x, {s['layers']:>2} layers: {s['tok_s']:7.0f} tok/s, limit {s['limit_tok_s']:7.0f} ({s['ratio']:.0%})")
    print(f"optimizer floor: Adam moves {floor['adam_bytes_per_step'] / 1e6:.0f} MB per step at {floor['bandwidth_gb_s']:.1f} GB/s "
          f"measured = {floor['t_adam_min_s'] * 1e3:.0f} ms per step of {args.batch_size * args.ctx_len} tokens; with it a step "
          f"can reach at most {floor['ceiling_share']:.0%} of the limit at this step size")
    if cached:
        print(f"{cached['trainer']}: {cached['tok_s']:.0f} tok/s, {cached['ratio_to_sae_only_limit']:.0%} of the SAE-only limit "
              f"({cached['sae_only_limit_tok_s']:.0f} tok/s: {len(cached['layers'])} x the encoder product); FVU "
              f"{cached['fvu'][0]:.4f} (all tokens {cached['fvu'][1]:.4f})")
    if profile:
        print(format_profile(profile))
    result = {"machine": machine, "config": config, "limit": limit, "limits_timed": limits, "optimizer_floor": floor,
              "rounds": rounds, "rows": rows,
              "sweep": sweep, **({"from_cache": cached} if cached else {}), **({"profile": profile} if profile else {})}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"throughput-{'gpu' if gpu else 'cpu'}-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"json: {out}")


if __name__ == "__main__":
    sys.exit(main())
