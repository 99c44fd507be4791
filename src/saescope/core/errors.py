"""The exceptions users see: each message is a complete one-line explanation.

`ParamError` names the parameters it is about as Python does (`max_length`); the command line shows the same message
with its flags instead (`--max-length`), so the library never speaks of flags and the CLI never rewrites prose."""

from __future__ import annotations

from collections.abc import Callable


class SaescopeError(Exception):
    """Bad input or an unrecoverable condition, explained in one line (the CLI prints only the message)."""


class InputError(SaescopeError):
    """A file or value that parses but holds something wrong; the message names where and what."""


class ParamError(InputError):
    """A bad value of named parameters. `template` holds one `{}` per name in `params`."""

    def __init__(self, template: str, *params: str):
        self.template, self.params = template, params
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with each parameter shown by `name` (the CLI passes its flag lookup)."""
        return self.template.format(*(name(p) for p in self.params))
