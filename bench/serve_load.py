"""Load on `saescope serve`: N requests, C at a time, a mix of valid requests and every kind of hostile one (the bad
requests of tests/inspect/test_serve.py: wrong types, unknown fields, a 17,000-deep array, a 10 MB body, NaN,
out-of-range ids), against a real server process on 127.0.0.1. Reports per-status counts, p50/p99 latency of the
valid and of the refused requests, the server's peak resident memory (VmHWM), and any traceback or error line in its
log.

    python bench/serve_load.py --sae runs/demo --requests 1000 --concurrency 50 --json bench/results/serve-load.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_requests import BAD_REQUESTS  # noqa: E402  (the test suite's hostile requests)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True)
    p.add_argument("--layers", default="15")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--json")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path("/tmp") / f"serve-load-{port}.log", "w+")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "saescope", "serve", "--sae", a.sae, "--layers", a.layers, "--port",
                               str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            info = httpx.get(url + "/api/info", timeout=1).json()
            break
        except httpx.TransportError:
            time.sleep(0.2)
    layer = info["layers"][0]
    valid = [("POST", "/api/encode", {"text": "Janet has three ducks and sells the eggs at the market."}, 200, None),
             ("GET", f"/api/feature/{layer}/5", None, 200, None),
             ("POST", "/api/encode", {"text": "Le chat dort.", "layers": [layer], "top": 3}, 200, None)]
    d_sae = info["d_sae"][str(layer)] if str(layer) in info["d_sae"] else info["d_sae"][layer]
    bad = [(m, path.replace("/1/64", f"/1/{d_sae}").replace("/1/", f"/{layer}/").replace("/9/", "/99/"), body, status, frag)
           for m, path, body, status, frag in BAD_REQUESTS if "/api/steer" not in path]
    bad = [c if not (isinstance(c[2], dict) and c[2].get("layers") == [7]) else (*c[:2], {"text": "hi", "layers": [99]}, *c[3:])
           for c in bad]
    mix = valid * 4 + bad  # about a third valid
    cases = [mix[i % len(mix)] for i in range(a.requests)]

    def send(case):
        method, path, body, want, _ = case
        start = time.perf_counter()
        if method == "GET":
            r = httpx.get(url + path, timeout=120)
        elif isinstance(body, bytes):
            r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=120)
        else:
            r = httpx.post(url + path, json=body, timeout=120)
        return want, r.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(a.concurrency) as pool:
        got = list(pool.map(send, cases))
    wall = time.perf_counter() - start
    hwm = next(int(ln.split()[1]) for ln in open(f"/proc/{server.pid}/status") if ln.startswith("VmHWM")) / 1024
    server.terminate()
    server.wait(timeout=30)
    log.seek(0)
    text = log.read()

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None

    ok = [t for want, status, t in got if status == 200]
    refused = [t for want, status, t in got if 400 <= status < 500]
    result = {"requests": len(got), "concurrency": a.concurrency, "wall_s": round(wall, 1),
              "status_counts": dict(sorted(Counter(str(s) for _, s, _ in got).items())),
              "as_expected": sum(want == status for want, status, _ in got),
              "latency_ms": {"valid_p50": pct(ok, 0.5), "valid_p99": pct(ok, 0.99), "refused_p50": pct(refused, 0.5),
                             "refused_p99": pct(refused, 0.99), "all_median": statistics.median(t for *_, t in got) * 1000},
              "server_peak_rss_mb": round(hwm), "tracebacks_in_log": text.count("Traceback"),
              "error_lines_in_log": [ln for ln in text.splitlines() if "error" in ln.lower()][:5],
              "sae": a.sae, "layers": a.layers, "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
