"""`saescope` command line: parse, call the Python API, print. Errors are one line, never a traceback.

One module per command group, each with a `COMMANDS` table of `Command(config, run, help)` (saescope.cli.flags):
the flags are made from the config, the run is the library's. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from saescope.cli import eval as eval_commands
from saescope.cli import formats, groundtruth, inspect, redundancy, sasft, synthesis, toxicity, train, trust
from saescope.cli.flags import Command, Parser, add_commands, flags_of, given_flags
from saescope.core.errors import ParamError, SaescopeError

GROUPS = (train, eval_commands, formats, trust, redundancy, inspect, toxicity, synthesis, sasft, groundtruth)


def build_parser() -> Parser:
    parser = Parser(prog="saescope", description="Top-k SAEs on every layer of a language model. "
                    "--debug (anywhere on the line) shows the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        add_commands(sub, group.COMMANDS)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SAESCOPE_DEBUG", "") not in ("", "0")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"saescope: warning: {message}", file=sys.stderr if file is None else file)


def message(exc: SaescopeError, command: Command) -> str:
    """The error's one line as this command's user reads it: parameters named by their flags."""
    if isinstance(exc, ParamError):
        flags = flags_of(command)
        return exc.render(lambda p: flags.get(p, p))
    return str(exc)


def parse_config(argv: list[str]):
    """The config a command line gives (validated as the command would run it), and its command; a bad value is a
    SaescopeError whose message names the flag."""
    from saescope.cli.flags import config_from_flags

    args = build_parser().parse_args(argv)
    try:
        return config_from_flags(args._command.config, args)
    except SaescopeError as exc:
        raise SaescopeError(message(exc, args._command)) from exc


def run_command(command: Command, a: argparse.Namespace) -> None:
    """config from the flags -> the library's run -> print its result."""
    if command.handler is not None:
        command.handler(a)
        return
    from saescope.cli.flags import config_from_flags

    result = command.run(config_from_flags(command.config, a))
    text = result.text() if result is not None else ""
    if text:
        print(text)


def _threads() -> None:
    threads = os.environ.get("SAESCOPE_THREADS", "")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise SaescopeError(f"SAESCOPE_THREADS must be a positive integer, got {threads!r}")
        import torch

        torch.set_num_threads(int(threads))


# Commands whose loops train (SAEs or the LM): glibc's default allocator is kept for them. Measured for `train` (all 30
# SmolLM2 layers, 16x-k50, 4,096 tokens per step, two back-to-back pairs): 1,481 and 1,395 tok/s with the default,
# 1,422 and 1,347 with freed memory kept, whereas reading commands gain (quality 79.6 -> 59.6 s).
TRAINING_COMMANDS = frozenset({"train", "sweep", "control", "sasft", "rl"})


def entry() -> int:
    """The `saescope` console script: a reading command's process keeps freed memory for reuse
    (core.system.keep_freed_memory), then main. Tests and library users call main, which leaves the allocator alone."""
    from saescope.core.system import keep_freed_memory

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in TRAINING_COMMANDS:
        keep_freed_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [x for x in argv if x != "--debug"]
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    command: Command = args._command
    with warnings.catch_warnings():  # this process's warnings as one line each, restored when the command ends
        warnings.showwarning = _show_warning
        try:
            _threads()
            run_command(command, args)
        except SaescopeError as exc:  # a ParamError names parameters as the library does: shown with the flags
            print(f"saescope: error: {message(exc, command)}", file=sys.stderr)
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
