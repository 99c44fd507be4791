"""Where in the dictionary an SAE's clean latents sit: per group of latents (Matryoshka's nested prefixes: the first
d_sae/16, /16-/8, /8-/4, /4-/2, /2-all), the share whose decoder row is at cosine > 0.9 to a true feature of the
ground-truth set, and the mean best cosine. Used in bench/RESULTS.md (ground truth, part 3) to show that Matryoshka's
late latents, which only the full-dictionary loss trains, are the ones left unaligned.

    python bench/ground_truth_groups.py --synthetic bench/work/gt5/set bench/work/gt5/matryoshka-k6 bench/work/gt5/topk-k6
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.api.ground_truth import RECOVERED_COS
from saescope.apps.groundtruth.run import read_synthetic
from saescope.core.io import load_saes
from saescope.core.sae.kinds import matryoshka_prefixes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", required=True)
    p.add_argument("saes", nargs="+")
    a = p.parse_args()
    features, _ = read_synthetic(Path(a.synthetic))
    directions = features.directions.float()
    for path in a.saes:
        sae = next(iter(load_saes(path).values()))
        W = sae.W_dec.detach().float()
        best = (directions @ (W / W.norm(dim=1, keepdim=True)).T).max(0).values  # per latent: its best true feature
        edges = [0, *matryoshka_prefixes(W.shape[0])]
        cells = [f"{lo}-{hi}: {float((best[lo:hi] > RECOVERED_COS).float().mean()):.3f} ({float(best[lo:hi].mean()):.3f})"
                 for lo, hi in zip(edges[:-1], edges[1:])]
        print(f"{path}: latents at cosine > {RECOVERED_COS} (mean best cosine) by group: " + "; ".join(cells))


if __name__ == "__main__":
    main()
