"""Kill -9 and resume: an all-layer training run killed with SIGKILL at random moments and resumed each
time must end bitwise equal to the same run left alone.

    python bench/kill_resume.py                     # SmolLM2, all 30 layers, 4x-k32, 1M tokens, 3 kills
    python bench/kill_resume.py --kills 5 --seed 1  # other kill moments
    python bench/kill_resume.py --layers 0,1 --max-tokens 32768 --batch-size 4 --ctx-len 128 \\
        --checkpoint-every 4 --kills 2              # a quick check (a few minutes on 2 CPU cores)

Both runs are the real command line in subprocesses, `python -m saescope train --out DIR ...` with the
same flags. Run A runs uninterrupted and is timed. Run B is started, killed (SIGKILL to its whole process
group) at moments drawn with a seeded RNG, one uniformly inside each of kills+1 equal segments of run A's
wall time (measured from B's first start; the last segment gets no kill, so B, slowed by its restarts, is
still running at every kill), and restarted after each kill with the same command plus `--resume`;
after the last kill it runs to the end. A kill before the first checkpoint is allowed: the restart must
then start afresh, or refuse --resume with a clear error, after which B is started without it, as a
user would (recorded either way). Then every layer's final W_enc, b_enc, W_dec, b_dec and the final training
state (optimizer, dead-latent counters, outlier medians, data position, the global torch RNG state,
which the trainer seeds from --seed) of A and B are compared with torch.equal.

A short warm-up run first fetches the model and corpus and builds the CPU kernels, so that A's time is
training alone (--no-warmup skips it). Children's output goes to log files in the scratch folder, one
line per event to the terminal. Writes JSON to bench/results/kill-resume-<tag>.json; exit code 0 only
if every layer and the training state are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saescope.core.io import load_saes, resolve_run

ROOT = Path(__file__).resolve().parents[1]
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
RESUMING = re.compile(r"resuming .* at step (\d+) \(")
TRAINED = re.compile(r"trained \d+ SAEs .* on (\d+) tokens in \d+s \((\d+) tok/s\)")


# ---------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model_name = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    if not flags and Path("/proc/cpuinfo").is_file():
        m = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        flags = set(m.group(1).split()) if m else set()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return {"cpu": model_name, "amx": sorted(f for f in flags if f.startswith("amx")),
            "avx512_bf16": "avx512_bf16" in flags, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if use_cuda else None, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


# ---------------------------------------------------------------- children
class Child:
    """One `saescope train` process in its own session (so that SIGKILL reaches all it started), output to a log."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self.started = time.perf_counter()
        with open(log, "wb") as f:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env=env, start_new_session=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @staticmethod
    def resume_line(log: Path) -> int | None:
        """The step a resumed run says it continues from (printed before training starts: the log's head suffices)."""
        try:
            with open(log, "rb") as f:
                head = f.read(1 << 16).decode(errors="replace")
        except OSError:
            return None
        m = RESUMING.search(head)
        return int(m.group(1)) if m else None

    def resumed_from(self) -> int | None:
        return self.resume_line(self.log)

    def kill(self) -> bool:
        """SIGKILL the whole process group; whether the process was still running."""
        alive = self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return alive

    def wait_until(self, deadline: float | None, on_resume=None) -> int | None:
        """Wait for the exit or the deadline (perf_counter time); the exit code, or None at the deadline.
        on_resume(step) is called once when the log says 'resuming'."""
        told = on_resume is None
        while True:
            rc = self.proc.poll()
            if not told:
                step = self.resumed_from()
                if step is not None:
                    on_resume(step)
                    told = True
            if rc is not None:
                return rc
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            time.sleep(0.02 if deadline is not None and deadline - time.perf_counter() < 0.5 else 0.2)


def latest_step(run: Path) -> int | None:
    pointer = run / "latest"
    if not pointer.is_file():
        return None
    m = re.search(r"step-(\d+)", pointer.read_text())
    return int(m.group(1)) if m else None


def error_line(path: Path) -> str:
    """The last 'error' line of a log (the CLI's one-line errors), else its last line."""
    lines = [line.split("\r")[-1].strip() for line in (path.read_text(errors="replace") if path.exists() else "").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1][:300]


def log_tail(path: Path, n: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-n:])


# ---------------------------------------------------------------- comparison
def _compare_obj(a, b, path: str, diffs: list[str], max_abs: list[float]) -> None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            diffs.append(f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            diffs.append(path)
            if a.is_floating_point():
                max_abs.append(float((a.double() - b.double()).abs().max()))
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            diffs.append(f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}")
        for key in a.keys() & b.keys():
            _compare_obj(a[key], b[key], f"{path}.{key}", diffs, max_abs)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_obj(x, y, f"{path}[{i}]", diffs, max_abs)
    elif type(a) is not type(b) or a != b:
        diffs.append(f"{path}: {a!r} vs {b!r}")


def _same_tensor(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """Every layer's final SAE tensors and the final training-state files of two runs, bitwise."""
    saes_a, saes_b = load_saes(run_a), load_saes(run_b)
    layers, max_abs = {}, 0.0
    for n in sorted(set(saes_a) | set(saes_b)):
        if n not in saes_a or n not in saes_b:
            layers[n] = {"equal": False, "why": f"only in run {'A' if n in saes_a else 'B'}"}
            continue
        row = {"equal": True, "max_abs_diff": 0.0, "differ": []}
        for name in TENSORS:
            ta, tb = getattr(saes_a[n], name).detach(), getattr(saes_b[n], name).detach()
            if ta.shape != tb.shape or ta.dtype != tb.dtype:
                row["equal"] = False
                row["differ"].append(f"{name} {ta.dtype}{tuple(ta.shape)} vs {tb.dtype}{tuple(tb.shape)}")
            elif not torch.equal(ta, tb):
                row["equal"] = False
                row["differ"].append(name)
                row["max_abs_diff"] = max(row["max_abs_diff"], float((ta.double() - tb.double()).abs().max()))
        max_abs = max(max_abs, row["max_abs_diff"])
        layers[n] = row
    ck_a, ck_b = resolve_run(run_a), resolve_run(run_b)
    names_a, names_b = sorted(p.name for p in ck_a.glob("state-rank*.pt")), sorted(p.name for p in ck_b.glob("state-rank*.pt"))
    state_diffs: list[str] = []
    state_max: list[float] = []
    rng_equal = True
    if names_a != names_b:
        state_diffs.append(f"state files {names_a} vs {names_b}")
    for name in sorted(set(names_a) & set(names_b)):
        sa = torch.load(ck_a / name, map_location="cpu", weights_only=True)
        sb = torch.load(ck_b / name, map_location="cpu", weights_only=True)
        # Reported apart: before the trainer seeded it, torch (2.13) seeded its generator at random in every process.
        rng_equal = rng_equal and _same_tensor(sa.pop("rng", None), sb.pop("rng", None))
        _compare_obj(sa, sb, name, state_diffs, state_max)
    state_checked = bool(names_a or names_b)
    return {"checkpoint_a": ck_a.name, "checkpoint_b": ck_b.name, "same_checkpoint_step": ck_a.name == ck_b.name,
            "layers": layers, "n_layers": len(layers), "n_equal": sum(r["equal"] for r in layers.values()),
            "max_abs_diff": max_abs, "state_files": names_a, "state_checked": state_checked,
            "state_equal": not state_diffs, "state_diffs": state_diffs[:50], "n_state_diffs": len(state_diffs),
            "state_max_abs_diff": max(state_max, default=0.0), "rng_equal": rng_equal}


# ---------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="default: the embedded corpus")
    p.add_argument("--layers", default="all", help="e.g. 0,1 or 0-5 (default: all)")
    p.add_argument("--preset", default="4x-k32")
    p.add_argument("--max-tokens", type=int, default=1_048_576)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=8)
    p.add_argument("--model-dtype", default="auto")
    p.add_argument("--sae-dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs during run B")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (the training seed stays 0)")
    p.add_argument("--workdir", default=None, help="a fresh kill-resume-* scratch folder is made in it (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (runs and logs)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (model/corpus fetch, kernel build)")
    p.add_argument("--timeout", type=float, default=0, help="seconds any one child may run (0 = no limit)")
    p.add_argument("--tag", default=None, help="default: <cpu|gpu>-<preset>-<layers>")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/kill-resume-<tag>.json)")
    args = p.parse_args()
    if args.kills < 1:
        p.error("--kills must be at least 1")

    machine = machine_info(args.device)
    layers_label = "all" if args.layers == "all" else args.layers.replace(",", "_")
    tag = args.tag or f"{'gpu' if machine['gpu'] else 'cpu'}-{args.preset}-{layers_label}"
    out_json = Path(args.out) if args.out else ROOT / "bench" / "results" / f"kill-resume-{tag}.json"

    def train_cmd(out: Path, *, max_tokens: int | None = None, layers: str | None = None, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "saescope", "train", "--out", str(out), "--model", args.model,
               "--preset", args.preset, "--max-tokens", str(max_tokens or args.max_tokens),
               "--batch-size", str(args.batch_size), "--ctx-len", str(args.ctx_len),
               "--checkpoint-every", str(args.checkpoint_every), "--model-dtype", args.model_dtype,
               "--sae-dtype", args.sae_dtype, "--device", args.device]
        if args.data:
            cmd += ["--data", args.data]
        layers = layers or args.layers
        if layers != "all":
            cmd += ["--layers", layers]
        return cmd + (["--resume"] if resume else [])

    parent = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-", dir=parent))
    run_a, run_b, logs = work / "A", work / "B", work / "logs"
    logs.mkdir()
    t0 = time.perf_counter()
    current: list[Child] = []

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:8.1f}s] {msg}", flush=True)

    def fail(msg: str, log: Path | None = None) -> int:
        say(f"FAILED: {msg}")
        if log is not None:
            print(log_tail(log), flush=True)
            print(f"(log: {log}{'' if args.keep else '; pass --keep to keep it'})", flush=True)
        return 1

    def run_to_end(child: Child, what: str, on_resume=None) -> int | None:
        deadline = child.started + args.timeout if args.timeout > 0 else None
        rc = child.wait_until(deadline, on_resume)
        if rc is None:
            child.kill()
            say(f"{what}: timed out after {args.timeout:.0f}s")
        return rc

    say(f"scratch folder {work}; logs in {logs}")
    try:
        if not args.no_warmup:
            say("warm-up: one step on the first layer (fetches model and corpus, builds kernels)")
            first = "0" if args.layers == "all" else re.split(r"[,-]", args.layers)[0]
            w = Child(train_cmd(work / "warmup", max_tokens=args.batch_size * args.ctx_len, layers=first), logs / "warmup.log")
            current[:] = [w]
            if run_to_end(w, "warm-up") != 0:
                return fail("the warm-up run failed", w.log)
            shutil.rmtree(work / "warmup", ignore_errors=True)
            say(f"warm-up done in {w.elapsed():.1f}s")

        # ---- run A: uninterrupted
        say("A: start (uninterrupted)")
        a = Child(train_cmd(run_a), logs / "A.log")
        current[:] = [a]
        if run_to_end(a, "A") != 0:
            return fail(f"run A exited with code {a.proc.returncode}", a.log)
        wall_a = a.elapsed()
        m = TRAINED.search(a.text())
        tokens = int(m.group(1)) if m else None
        trainer_tok_s_a = int(m.group(2)) if m else None
        say(f"A: finished in {wall_a:.1f}s ({tokens} tokens; trainer {trainer_tok_s_a} tok/s, "
            f"{tokens / wall_a if tokens else float('nan'):.0f} tok/s wall)")

        # ---- run B: killed and resumed
        rng = random.Random(args.seed)
        segment = wall_a / (args.kills + 1)
        kill_at = [rng.uniform(i * segment, (i + 1) * segment) for i in range(args.kills)]
        say("B: kill moments (s after B's start): " + ", ".join(f"{t:.1f}" for t in kill_at))
        kills: list[dict] = []
        procs: list[dict] = []  # every process of run B, in order
        b_start = time.perf_counter()
        b: Child | None = None
        on_resume = None

        def start_b(resume: bool) -> None:
            nonlocal b, on_resume
            n = len(procs)
            b = Child(train_cmd(run_b, resume=resume), logs / f"B-{n}.log")
            current[:] = [b]
            procs.append({"process": n, "resume": resume, "log": b.log.name, "killed": False, "rc": None})
            on_resume = (lambda s: say(f"B: process {n} resuming from step {s}")) if resume else None
            say(f"B: {'restart with --resume' if resume else 'start'} (process {n})")

        def wait_b(deadline: float | None, final: bool = False) -> int | None:
            """Wait for B's process until it exits (its code) or the deadline (None). A --resume refused with a clear
            error because the kill came before the first checkpoint is followed, as a user would, by a plain start."""
            while True:
                limit = (b.started + args.timeout if args.timeout > 0 else None) if final else deadline
                rc = b.wait_until(limit, on_resume)
                if rc is None and final:
                    b.kill()
                    say(f"B: process {procs[-1]['process']} timed out after {args.timeout:.0f}s")
                    return -1
                procs[-1]["rc"] = rc
                if (rc not in (None, 0) and procs[-1]["resume"] and kills and kills[-1]["latest_checkpoint_step"] is None
                        and "--resume" in (msg := error_line(b.log))):
                    kills[-1]["resume_refused"], kills[-1]["fresh_process"] = msg, len(procs)
                    say(f"B: --resume refused with a clear error ({msg}); starting without --resume")
                    start_b(resume=False)
                    continue
                return rc

        start_b(resume=False)
        for i, t_kill in enumerate(kill_at):
            rc = wait_b(b_start + t_kill)
            n = procs[-1]["process"]
            if rc is not None:  # ended before the kill: a failure, or it finished (B faster than A)
                if rc != 0:
                    return fail(f"B process {n} exited with code {rc} before kill {i + 1}", b.log)
                say(f"B: process {n} finished before kill {i + 1} was due; remaining kills skipped")
                break
            proc_s = b.elapsed()
            alive = b.kill()
            procs[-1]["killed"] = True
            at = time.perf_counter() - b_start
            step = latest_step(run_b)
            kills.append({"kill": i + 1, "at_s": round(at, 2), "planned_at_s": round(t_kill, 2),
                          "process": n, "process_s": round(proc_s, 2), "was_running": alive,
                          "latest_checkpoint_step": step, "restart_process": n + 1})
            say(f"B: kill {i + 1} (SIGKILL) at {at:.1f}s, {proc_s:.1f}s into process {n}; "
                + (f"latest checkpoint: step {step}" if step is not None else "no checkpoint yet"))
            start_b(resume=True)
        rc = wait_b(None, final=True)
        if rc != 0:
            return fail(f"the last B process (process {procs[-1]['process']}) exited with code {rc}", b.log)
        wall_b = time.perf_counter() - b_start
        m = TRAINED.search(b.text())
        trainer_tok_s_b_last = int(m.group(2)) if m else None
        say(f"B: finished in {wall_b:.1f}s in total ({len(kills)} kills, {len(procs)} processes)")

        # what each restart did: resumed from the step `latest` named, or, when there was none, started afresh
        # or refused --resume with a clear error (then started without it)
        for k in kills:
            restart = procs[k["restart_process"]]
            step = Child.resume_line(logs / restart["log"])
            k["resumed"], k["resumed_from_step"] = step is not None, step
            if step is not None:
                k["outcome"], k["consistent"] = f"resumed from step {step}", step == k["latest_checkpoint_step"]
            elif k["latest_checkpoint_step"] is None and "resume_refused" in k:
                k["outcome"], k["consistent"] = "--resume refused (no checkpoint yet); started without it", True
            elif k["latest_checkpoint_step"] is None:
                k["outcome"], k["consistent"] = "started afresh (no checkpoint yet)", True
            elif restart["killed"]:  # killed again while loading the model, before it could say so
                k["outcome"], k["consistent"] = "killed again before it had loaded the checkpoint", True
            else:
                k["outcome"], k["consistent"] = "did NOT resume although a checkpoint existed", False

        # ---- compare
        cmp = compare_runs(run_a, run_b)
        passed = (cmp["n_equal"] == cmp["n_layers"] > 0 and cmp["same_checkpoint_step"]
                  and (cmp["state_equal"] and cmp["rng_equal"] or not cmp["state_checked"]) and all(k["consistent"] for k in kills))
        b_tokens = tokens
        result = {
            "machine": machine,
            "config": {"model": args.model, "data": args.data or "embedded corpus", "layers": args.layers, "preset": args.preset,
                       "max_tokens": args.max_tokens, "batch_size": args.batch_size, "ctx_len": args.ctx_len,
                       "checkpoint_every": args.checkpoint_every, "model_dtype": args.model_dtype, "sae_dtype": args.sae_dtype,
                       "device": args.device, "kills": args.kills, "kill_seed": args.seed,
                       "command": " ".join(train_cmd(Path("DIR"))[1:])},
            "run_a": {"wall_s": round(wall_a, 2), "tokens": tokens, "tok_s_wall": tokens / wall_a if tokens else None,
                      "trainer_tok_s": trainer_tok_s_a},
            "run_b": {"wall_s": round(wall_b, 2), "tokens": b_tokens, "tok_s_wall": b_tokens / wall_b if b_tokens else None,
                      "processes": len(procs), "process_list": procs, "kills_done": len(kills), "kills_planned_at_s": [round(t, 2) for t in kill_at],
                      "last_process_trainer_tok_s": trainer_tok_s_b_last,
                      "overhead_vs_a": wall_b / wall_a - 1},
            "kills": kills,
            "comparison": cmp,
            "passed": passed,
        }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1, default=str))

        # ---- summary
        cpu = f"{machine['cpu']}, {machine['cpus_usable']}/{machine['cpu_count']} CPUs, amx: {','.join(machine['amx']) or 'no'}, " \
              f"avx512_bf16: {'yes' if machine['avx512_bf16'] else 'no'}"
        print(f"\n{machine['gpu'] or 'CPU'}; {cpu}; torch {machine['torch']}")
        print(f"{args.model}, layers {args.layers}, {args.preset}, {tokens} tokens in steps of {args.batch_size} x {args.ctx_len}, "
              f"checkpoint every {args.checkpoint_every} steps")
        print(f"{'kill':>4} {'at s':>8} {'in proc s':>9} {'latest ckpt':>11}  restart")
        for k in kills:
            print(f"{k['kill']:>4} {k['at_s']:8.1f} {k['process_s']:9.1f} "
                  f"{'-' if k['latest_checkpoint_step'] is None else k['latest_checkpoint_step']:>11}  {k['outcome']}"
                  + ("" if k["consistent"] else "  (INCONSISTENT)"))
        print(f"{'run':<26} {'wall s':>8} {'tok/s':>7}")
        print(f"{'A uninterrupted':<26} {wall_a:8.1f} {result['run_a']['tok_s_wall'] or 0:7.0f}")
        print(f"{f'B {len(kills)} kills, {len(procs)} processes':<26} {wall_b:8.1f} {result['run_b']['tok_s_wall'] or 0:7.0f}")
        print(f"layers bitwise equal: {cmp['n_equal']}/{cmp['n_layers']} (W_enc, b_enc, W_dec, b_dec; max |diff| {cmp['max_abs_diff']:.3g}); "
              f"final checkpoints {cmp['checkpoint_a']} / {cmp['checkpoint_b']}")
        if cmp["state_checked"]:
            print(f"training state ({', '.join(cmp['state_files'])}: optimizer, counters, medians, data position): "
                  + ("bitwise equal" if cmp["state_equal"] else
                     f"{cmp['n_state_diffs']} differences, e.g. {cmp['state_diffs'][:3]} (max |diff| {cmp['state_max_abs_diff']:.3g})")
                  + ("; global torch RNG state equal" if cmp["rng_equal"] else
                     "; global torch RNG state differs"))
        else:
            print("training state: no state files in the final checkpoints")
        print(f"{'PASS' if passed else 'FAIL'}; json: {out_json}")
        return 0 if passed else 1
    finally:
        for child in current:
            if child.proc.poll() is None:
                child.kill()
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
