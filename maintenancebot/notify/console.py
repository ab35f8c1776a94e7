"""The console notifier: writes a run's summary (optionally its details) to a text stream.

For `run` in a terminal, cron mail and the journal. It writes only what it is given, to the stream
it is given (the CLI chooses it); it never decides what a run's outcome was.
"""

from __future__ import annotations

import sys
from typing import TextIO

from maintenancebot.notify import DRY, NotifyError, RunMessage


class ConsoleNotifier:
    name = "console"

    def __init__(self, stream: TextIO | None = None, *, details: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._details = details

    def send(self, message: RunMessage) -> None:
        text = message.summary.rstrip("\n")
        if message.dry_run and DRY not in text:  # the summary says so already; never omit it
            text = f"{DRY}: {text}"
        if self._details:
            text += "\n\n" + message.details.rstrip("\n")
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a closed pipe or stream
            raise NotifyError(f"console: {exc}") from exc
