"""`saescope control | stability | transfer`: random controls, seed stability between two SAE sets, and transfer
of SAEs to another checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import layer_list, model_of, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control", help="make a random-direction control SAE set shaped like trained SAEs")
    p.add_argument("kind", choices=["random"])
    p.add_argument("--like", required=True, help="the SAEs to imitate (shape, k, decoder bias)")
    writes(p, "--out", folder=True, required=True, help="the control's folder (e.g. RUN/control)")
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
    writes(p, "--out", folder=False, help="JSON results (default: A/trust/stability.json)")

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
    writes(p, "--out", folder=False, help="JSON results (default: SAE/trust/transfer.json)")


def cmd_control(a: argparse.Namespace) -> None:
    from saescope.api.controls import make_controls, save_controls
    from saescope.core.io import load_saes

    saes = load_saes(a.like, layers=layer_list(a.layers), k=a.k)
    lm = None
    if a.subspace:
        from saescope.core.models import load_model

        lm = load_model(model_of(saes, a.model), dtype="fp32")
    controls = make_controls(saes, seed=a.seed, subspace=a.subspace, lm=lm, data=a.data, n_tokens=a.n_tokens,
                             variance=a.variance)
    save_controls(controls, Path(a.out), like=a.like)
    dims = {n: c.meta["control"]["subspace_dim"] for n, c in controls.items()}
    detail = f", directions in the top {min(dims.values())}-{max(dims.values())} principal components" if a.subspace else ""
    first = next(iter(controls.values())).cfg
    print(f"random control for {len(controls)} layers (d_sae {first.d_sae}, k {first.k}{detail}) in {a.out}")


def cmd_stability(a: argparse.Namespace) -> None:
    from saescope.api.controls import load_control
    from saescope.core.io import load_saes
    from saescope.apps.trust import format_stability
    from saescope.apps.trust.seeds import stability_between

    if len(a.sae) != 2:
        raise SaescopeError(f"give exactly two SAE sets (--sae A --sae B), got {len(a.sae)}")
    saes_a = load_saes(a.sae[0], layers=layer_list(a.layers), k=a.k)
    saes_b = load_saes(a.sae[1], layers=layer_list(a.layers), k=a.k)
    shared = {n: saes_a[n] for n in saes_a if n in saes_b}
    control = load_control(a.control, shared) if a.control and shared else None
    lm = None
    if a.n_tokens > 0:
        from saescope.core.models import load_model
        from saescope.api.scope import check_fit

        lm = load_model(model_of(saes_a, a.model), dtype="fp32")
        check_fit(lm, shared)
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae[0]).trust / "stability.json"
    result = stability_between(saes_a, saes_b, lm, out, data=a.data, text_column=a.text_column, n_tokens=a.n_tokens,
                               control=control, labels=(a.sae[0], a.sae[1]))
    print(format_stability(result["layers"], result["control"]))
    print(f"stability results: {out}")


def cmd_transfer(a: argparse.Namespace) -> None:
    from saescope.core.files import atomic_write_json
    from saescope.core.io import load_saes
    from saescope.core.models import load_model
    from saescope.apps.trust import format_transfer, transfer_report

    saes = load_saes(a.sae, layers=layer_list(a.layers), k=a.k)
    source = load_model(model_of(saes, a.source_model), dtype="fp32")
    target = load_model(a.model, dtype="fp32")
    report = transfer_report(saes, source, target, data=a.data, text_column=a.text_column, n_tokens=a.n_tokens,
                             ctx_len=a.ctx_len)
    print(format_transfer(report))
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).trust / "transfer.json"
    atomic_write_json(out, report)
    print(f"transfer results: {out}")


COMMANDS = {"control": cmd_control, "stability": cmd_stability, "transfer": cmd_transfer}
