"""A command's output on an SSH session channel, read as it arrives.

Plain threading, no paramiko import: the channel is duck-typed (a paramiko `Channel`), so that
`transports.ssh` stays the one module importing paramiko. Both streams are drained together, so
neither can fill its window while we wait on the other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from maintenancebot.transports.base import OutputTail

CHUNK = 65536
POLL_SECONDS = 1.0  # upper bound of one wait; data, EOF and a lost connection wake us earlier


def collect(channel: Any, deadline: float | None,
            limit: int | None = None) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr together until EOF (True) or the deadline (False), keeping the
    last `limit` bytes of each (`OutputTail`)."""
    out, err = OutputTail(limit), OutputTail(limit)
    done = read(channel, Arrivals(channel), out.add, err.add, deadline)
    return out.value(), err.value(), done


def read(channel: Any, arrivals: Arrivals, on_stdout: Callable[[bytes], object],
         on_stderr: Callable[[bytes], object], deadline: float | None,
         finished: Callable[[], bool] = lambda: False) -> bool:
    """Hand stdout and stderr to their callbacks as they arrive, until `finished()` or EOF
    (True), or the deadline (False)."""
    while True:
        # Checked before draining: data sent before EOF is then certainly in the buffers.
        ended = channel.eof_received or channel.closed
        while channel.recv_ready():
            on_stdout(channel.recv(CHUNK))
        while channel.recv_stderr_ready():
            on_stderr(channel.recv_stderr(CHUNK))
        if ended or finished():
            return True
        wait = remaining(deadline)
        if wait is not None and wait <= 0:
            return False
        arrivals.wait(POLL_SECONDS if wait is None else min(POLL_SECONDS, wait))


class Arrivals:
    """Set while the channel's stdout or stderr holds data or has closed (EOF, a lost
    connection): what `collect` waits on, so both streams drain and neither can fill its
    window while we wait on the other. paramiko's `Channel.fileno()` gives the same through an
    OS pipe: two descriptors per channel and a write and a read syscall per packet, ~2% of a
    50-host run. Its stream buffers take any object with set() and clear() as their event, so
    here it is one flag per stream and one Event."""

    def __init__(self, channel: Any) -> None:
        self._lock = threading.Lock()
        self._ready = [False, False]
        self._event = threading.Event()
        channel.in_buffer.set_event(_StreamFlag(self, 0))
        channel.in_stderr_buffer.set_event(_StreamFlag(self, 1))

    def mark(self, stream: int, ready: bool) -> None:
        with self._lock:
            self._ready[stream] = ready
            if any(self._ready):
                self._event.set()
            else:
                self._event.clear()

    def wait(self, seconds: float) -> bool:
        """True when woken by an arrival, False when `seconds` passed without one."""
        return self._event.wait(seconds)


class _StreamFlag:
    __slots__ = ("_arrivals", "_stream")

    def __init__(self, arrivals: Arrivals, stream: int) -> None:
        self._arrivals = arrivals
        self._stream = stream

    def set(self) -> None:
        self._arrivals.mark(self._stream, True)

    def clear(self) -> None:
        self._arrivals.mark(self._stream, False)


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
