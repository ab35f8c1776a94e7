"""Live progress of a run on the terminal: a per-host table when interactive, lines otherwise.

Observers only update a dict under a lock; rich redraws on its own thread at a bounded rate, so a
500-host run cannot be slowed down by its own display.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Self, TextIO

from maintenancebot.runcontrol import Event
from maintenancebot.states import HostStatus
from maintenancebot.views import STATUS_STYLE

if TYPE_CHECKING:  # rich loads only for a terminal: LiveProgress imports it when made
    from rich.console import Console
    from rich.table import Table

_SHOWN_ROWS = 40


class LiveProgress:
    """A rich Live table: one row per host, its state and the step it is on."""

    def __init__(self, console: Console, hosts: list[str], steps: int, dry_run: bool) -> None:
        from rich.live import Live

        self._rows: dict[str, tuple[str, str, int]] = {h: ("pending", "", 0) for h in hosts}
        self._steps = steps
        self._title = ("DRY RUN — " if dry_run else "") + "progress"
        self._lock = threading.Lock()
        self._live = Live(console=console, refresh_per_second=4, transient=True,
                          get_renderable=self._render)

    def __call__(self, event: Event) -> None:
        with self._lock:
            status, step, done = self._rows.get(event.host, ("pending", "", 0))
            if event.step is None:
                self._rows[event.host] = (str(event.status), step, done)
            else:
                self._rows[event.host] = (status, f"{event.step}: {event.status}", done + 1)

    def _render(self) -> Table:
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            rows = dict(self._rows)
        finished = sum(1 for status, _, _ in rows.values() if status not in ("pending", "running"))
        table = Table(title=f"{self._title}: {finished}/{len(rows)} hosts finished",
                      title_justify="left")
        for column in ("host", "status", "steps", "last step"):
            table.add_column(column)
        running_first = sorted(rows.items(), key=lambda item: item[1][0] != "running")
        for host, (status, step, done) in running_first[:_SHOWN_ROWS]:
            table.add_row(host, Text(status, style=STATUS_STYLE.get(status, "")),
                          f"{min(done, self._steps)}/{self._steps}", step)
        if len(rows) > _SHOWN_ROWS:
            table.caption = f"and {len(rows) - _SHOWN_ROWS} more hosts"
        return table

    def __enter__(self) -> Self:
        self._live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._live.__exit__(kind, error, trace)


class LineProgress:
    """One line per finished host on stderr, for logs and pipes."""

    def __init__(self, stream: TextIO, dry_run: bool) -> None:
        self._stream = stream
        self._prefix = "DRY RUN " if dry_run else ""
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.step is None and event.status not in (HostStatus.RUNNING, HostStatus.PENDING):
            # Plain text to a pipe: rich's rendering would cost a millisecond a line.
            with self._lock:
                self._stream.write(f"{self._prefix}host {event.host}: {event.status}\n")
                self._stream.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
