"""The CLI's two output streams, as rich Consoles made on first use.

A run under systemd or in a pipe never draws a table, and importing rich costs about 30 ms of
every start (2% of a 50-host run). So `is_terminal` answers without rich when the stream cannot
count as a terminal by rich's own rules: it is not a tty and neither FORCE_COLOR nor
TTY_COMPATIBLE says otherwise. In every other case rich decides, as it always did.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console

_TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE")


class LazyConsole:
    def __init__(self, *, stderr: bool = False, **options: Any) -> None:
        self._stderr = stderr
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            console = Console(stderr=self._stderr, **self._options)
            if not console.is_terminal:
                # Piped (a journal, a CI log, grep): one message, one line. rich would wrap at
                # 80 columns and cut `FILE:LINE: field: message` in two.
                console.soft_wrap = True
            self._console = console
        return self._console

    @property
    def file(self) -> TextIO:
        """The stream as it is now (tests and click swap sys.stdout and sys.stderr)."""
        return sys.stderr if self._stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        if self._console is None and not self._may_be_terminal():
            return False
        return self.console.is_terminal

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    def _may_be_terminal(self) -> bool:
        if any(name in os.environ for name in _TERMINAL_OVERRIDES):
            return True
        isatty = getattr(self.file, "isatty", None)
        try:
            return bool(isatty is not None and isatty())
        except ValueError:  # a closed stream
            return False
