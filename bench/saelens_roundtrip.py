"""Export saescope SAEs (any kind) to SAELens format and open them with sae-lens itself (in the peers' venv):
the encodings and reconstructions must equal saescope's, on real activations from a cache when one is given.

    python bench/saelens_roundtrip.py --sae runs/x --layers 3,15
    python bench/saelens_roundtrip.py --sae bench/work/kinds/sweep/jumprelu-k50 --activations bench/work/kinds/cache
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from saescope.core.io import export_saes, load_saes

ROOT = Path(__file__).resolve().parents[1]

PEER_SIDE = r"""
import sys, torch
from sae_lens import SAE
folder, inputs, out = sys.argv[1:4]
sae = SAE.load_from_disk(folder, device="cpu")
x = torch.load(inputs, weights_only=True)
with torch.no_grad():
    z = sae.encode(x)
    torch.save({"z": z, "x_hat": sae.decode(z), "cls": type(sae).__name__}, out)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sae", required=True)
    p.add_argument("--layers", default=None)
    p.add_argument("--activations", help="a saescope cache: its first 256 tokens of each layer are the inputs")
    p.add_argument("--json", help="write the report here too")
    p.add_argument("--peer-python", default=os.environ.get("SAESCOPE_PEER_PYTHON", str(ROOT.parent / "peers-venv" / "bin" / "python")))
    a = p.parse_args()
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    saes = load_saes(a.sae, layers=layers)
    work = Path(tempfile.mkdtemp())
    export_saes(saes, work, "saelens")
    report = {}
    for n, sae in saes.items():
        if a.activations:
            from saescope.core.activation_cache import open_activations

            x = open_activations(a.activations).rows(n, torch.arange(256))
        else:
            x = torch.randn(64, sae.cfg.d_model, generator=torch.Generator().manual_seed(n)) * 20
        torch.save(x, work / "x.pt")
        r = subprocess.run([a.peer_python, "-c", PEER_SIDE, str(work / f"layer{n}"), str(work / "x.pt"), str(work / "out.pt")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        theirs = torch.load(work / "out.pt", weights_only=True)
        with torch.no_grad():
            code = sae.encode(x)
            z, x_hat = code.dense(sae.cfg.d_sae), sae.decode(code)
        report[n] = {"kind": sae.cfg.kind, "saelens_class": theirs["cls"], "tokens": x.shape[0], "max_abs_diff_z": float((theirs["z"] - z).abs().max()),
                     "max_abs_diff_x_hat": float((theirs["x_hat"] - x_hat).abs().max()),
                     # per token, relative to its largest reconstructed value: fp32 rounding on the attention-sink
                     # token (|x_hat| ~ 1e5 at SmolLM2's layer 15) is large in absolute terms only
                     "max_rel_diff_x_hat": float(((theirs["x_hat"] - x_hat).abs().amax(1)
                                                  / x_hat.abs().amax(1).clamp_min(1.0)).max()),
                     "max_abs_diff_x_hat_without_token_0": float((theirs["x_hat"] - x_hat)[1:].abs().max()),
                     "same_active_set": bool(((theirs["z"] > 0) == (z > 0)).all())}
        print(f"layer {n}: {report[n]}")
    print(json.dumps(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
