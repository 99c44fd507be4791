"""`saescope export`: SAEs of any format read by saescope.core.io.load_saes, written in SAELens, Qwen-Scope or saescope format."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import layer_list, writes


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write SAEs in SAELens, Qwen-Scope or saescope format")
    p.add_argument("--sae", required=True)
    p.add_argument("--to", required=True, choices=["saelens", "qwen-scope", "saescope"])
    writes(p, "--out", folder=True, required=True, help="the folder to write into (SAE files there are never replaced)")
    p.add_argument("--layers")
    p.add_argument("--k", type=int)


def cmd_export(a: argparse.Namespace) -> None:
    from saescope.core.io import export_saes, load_saes

    saes = load_saes(a.sae, layers=layer_list(a.layers), k=a.k)
    model = next(iter(saes.values())).meta.get("model", "")
    for path in export_saes(saes, Path(a.out), a.to, model_name=model):
        print(path)


COMMANDS = {"export": cmd_export}
