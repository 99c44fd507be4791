"""`saescope export`: SAEs of any format read by saescope.core.io.load_saes, written in SAELens, Qwen-Scope or saescope
format."""

from saescope.cli.flags import Command
from saescope.core.io import ExportConfig, run_export

COMMANDS = {"export": Command(ExportConfig, run_export, "write SAEs in SAELens, Qwen-Scope or saescope format")}
