"""Process-level facts and hygiene shared by the long loops (footprints, feature stores, benchmarks)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from saescope.core.cache import cache_dir
from saescope.core.errors import SaescopeError


def release_heap() -> None:
    """Give freed heap back to the OS. Batches of varying shapes leave glibc holding freed blocks (RSS grew by
    0.7 GB over 2,000 prompts without this while the results were 8 MB); elsewhere it does nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """Have glibc serve large blocks from the heap and keep freed ones for reuse, for the rest of this process.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, so each batch's large tensors (a
    (4,096 x 4,608) bf16 pre-activation matrix, the LM's activations) are page-faulted in again: measured on 2 cores,
    the same encoder product 15.8 -> 6.1 ms and the LM forward 3.9k -> 5.9k tok/s with this set. The cost is that RSS
    does not fall back between batches (release_heap still trims on request), and a training loop, whose step reuses
    its own buffers already, measured no faster. The CLI's entry point sets it for reading commands' processes; a
    library user's process is left alone. SAESCOPE_MALLOC=default turns it off (the same settings as the environment
    variables MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 would make). True where it took."""
    if os.environ.get("SAESCOPE_MALLOC", "").lower() in ("default", "off", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM (ru_maxrss would carry a parent's peak over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# A CPU with native bf16 (AMX, AVX512-BF16) multiplies bf16 several times faster than fp32; one without it emulates
# bf16 and is several times slower. Which one this is gets measured, not guessed from flags.
BF16_MIN_SPEEDUP = 1.5  # the LM forward goes bf16 on a CPU only when bf16 matmuls are at least this much faster
_SPEEDUP: dict[str, float] = {}


def cpu_flags() -> str:
    """This CPU's feature flags (/proc/cpuinfo), for caches that must not outlive a change of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cpu_key() -> str:
    return hashlib.sha256((cpu_flags() + torch.__version__).encode()).hexdigest()[:12]


def _time_matmuls(rounds: int = 7) -> tuple[float, float]:
    """Median seconds of a (1,024 x 576) by (576 x 4,608) product in fp32 and in bf16 (an SAE encoder's shape on
    SmolLM2, and as wide as an LM's MLP), the two timed in turn so that a busy machine slows both alike."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 576, generator=gen), torch.randn(576, 4608, generator=gen)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in pairs}
    for x, y in pairs.values():
        x @ y  # warm-up: oneDNN builds its kernel on the first call
    for _ in range(rounds):
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            times[dtype].append(time.perf_counter() - start)
    fp32, bf16 = (sorted(t)[len(t) // 2] for t in times.values())
    return fp32, bf16


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a matmul on this CPU: measured once per machine and torch version (~0.2 s) and
    cached beside the compiled kernels (`saescope models` shows the cache)."""
    key = _cpu_key()
    if key in _SPEEDUP:
        return _SPEEDUP[key]
    path = cache_dir() / "kernels" / f"bf16-speed-{key}.json"
    try:
        speedup = float(json.loads(path.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        fp32, bf16 = _time_matmuls()
        speedup = fp32 / max(bf16, 1e-9)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"speedup": speedup, "fp32_s": fp32, "bf16_s": bf16,
                                        "threads": torch.get_num_threads()}))
        except OSError:
            pass  # a read-only cache: measure again next time
    _SPEEDUP[key] = speedup
    return speedup


def cpu_lm_dtype() -> torch.dtype:
    """The dtype `auto` gives a language model on this CPU: bf16 where bf16 matmuls are at least BF16_MIN_SPEEDUP
    times faster than fp32, else fp32. SAESCOPE_CPU_DTYPE=fp32 or bf16 decides instead."""
    forced = os.environ.get("SAESCOPE_CPU_DTYPE", "").lower()
    if forced in ("fp32", "float32"):
        return torch.float32
    if forced in ("bf16", "bfloat16"):
        return torch.bfloat16
    if forced:
        raise SaescopeError(f"SAESCOPE_CPU_DTYPE must be fp32 or bf16, got {forced!r}")
    return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32
