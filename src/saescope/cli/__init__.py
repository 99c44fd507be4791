"""`saescope` command line: parse, call the Python API, print. Errors are one line, never a traceback.

One module per command group, each with `add_parsers(sub)` and `COMMANDS`; what they share is in `flags`.
Nothing outside this package imports it.
"""

from __future__ import annotations

import os
import sys
import warnings

from saescope.cli import eval as eval_commands
from saescope.cli import formats, inspect, redundancy, sasft, synthesis, toxicity, train, trust
from saescope.cli.flags import Parser, apply_shared_data, check_flags, given_flags
from saescope.core.errors import SaescopeError

GROUPS = (train, eval_commands, formats, trust, redundancy, inspect, toxicity, synthesis, sasft)
COMMANDS = {name: command for group in GROUPS for name, command in group.COMMANDS.items()}


def build_parser() -> Parser:
    parser = Parser(prog="saescope", description="Top-k SAEs on every layer of a language model. "
                    "--debug (anywhere on the line) shows the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SAESCOPE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [x for x in argv if x != "--debug"]
    warnings.formatwarning = lambda msg, cat, *rest: f"saescope: warning: {msg}\n"
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    try:
        check_flags(args)
        apply_shared_data(args)
        import torch

        threads = os.environ.get("SAESCOPE_THREADS", "")
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise SaescopeError(f"SAESCOPE_THREADS must be a positive integer, got {threads!r}")
            torch.set_num_threads(int(threads))
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
    except Exception as exc:
        # A bug or an input no check foresaw: one line naming the command and what broke, unless --debug (or
        # SAESCOPE_DEBUG, which the test suite sets) asks for the traceback, so that real bugs are never hidden.
        if debug:
            raise
        if isinstance(exc, OSError) and exc.strerror:
            print(f"saescope: error: {args.command}: {exc.strerror}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return 2
        detail = (str(exc).splitlines() or [""])[0][:200]
        line = " ".join(argv)
        print(f"saescope: error: {args.command} (saescope {line[:160]}{'...' if len(line) > 160 else ''}): unexpected "
              f"{type(exc).__name__}: {detail} (rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    return 0
