"""What every host of one run shares: the deadline, the kill switch, the circuit breaker, events.

Host threads ask it two questions — may a new host start, may this host take its next step — and
report to it when a host ends. It owns the run's abort reason: the first of kill switch, run
timeout, breaker or failed batch that stopped the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from maintenancebot.models import format_duration
from maintenancebot.states import HostStatus, StepStatus
from maintenancebot.store import STOP_READ_SECONDS, RunStore, StopState


@dataclass(frozen=True)
class Event:
    """Progress for whoever watches a run (the CLI's live view); never drives the run."""

    run_id: str
    host: str
    step: str | None
    status: HostStatus | StepStatus


Observer = Callable[[Event], None]

_HOST_FAILURES = {HostStatus.FAILED, HostStatus.UNREACHABLE}


class ProcessStop:
    """This process is shutting down (the daemon got SIGTERM): every run it holds halts before
    its next step and ends `interrupted`, not `aborted` — nobody decided against the run, the
    controller went away. Process-wide by nature, like the signal that sets it; the store's kill
    switch is the fleet-wide twin. A signal handler may call `request`: it only sets a field."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def request(self, reason: str) -> None:
        self._reason = self._reason or reason

    def clear(self) -> None:
        self._reason = None

    @property
    def reason(self) -> str | None:
        return self._reason


PROCESS_STOP = ProcessStop()


class RunControl:
    def __init__(
        self,
        run_id: str,
        store: RunStore,
        *,
        timeout: float,
        max_failures: int | None,
        observer: Observer | None = None,
        action_state: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: float | None = None,
    ) -> None:
        self.run_id = run_id
        # The runbook's maintenance window, from the start of the run (the daemon shortens it
        # for a late run): after it no host starts; hosts already going finish their steps.
        self._window = window
        self._window_end = None if window is None else clock() + window
        self.action_state: Mapping[str, Any] = action_state or {}
        self._store = store
        self._timeout = timeout
        self._deadline = clock() + timeout
        self._clock = clock
        self._max_failures = max_failures
        self._observer = observer
        self._lock = threading.Lock()
        self._failures = 0
        self.contained_failures: set[str] = set()
        self._abort_reason: str | None = None
        self._halt: str | None = None
        self._interrupted = False
        self._stop: StopState | None = None
        self._stop_read_until = 0.0

    @property
    def interrupted(self) -> bool:
        """True when this process's shutdown halted the run (see `ProcessStop`)."""
        with self._lock:
            return self._interrupted

    @property
    def abort_reason(self) -> str | None:
        with self._lock:
            return self._abort_reason

    def abort(self, reason: str) -> None:
        with self._lock:
            self._abort_reason = self._abort_reason or reason

    def halt(self, reason: str) -> None:
        """Stop the whole run before every host's next step (an approval denied with
        `on_deny: abort`): unlike `abort`, hosts already going stop too."""
        with self._lock:
            self._halt = self._halt or reason
        self.abort(reason)

    def halt_reason(self) -> str | None:
        """Why no host may take another step (kill switch, run timeout, a halt), checked before
        each."""
        stop = self._stop_state()
        if self._halt is not None:
            return self._halt
        if PROCESS_STOP.reason is not None:
            reason = PROCESS_STOP.reason
            with self._lock:
                self._interrupted = True
        elif stop is not None:
            reason = f"kill switch set by {stop.by}: {stop.reason}"
        elif self._clock() >= self._deadline:
            reason = f"run timeout of {format_duration(self._timeout)} reached"
        else:
            return None
        self.abort(reason)
        return reason

    def _stop_state(self) -> StopState | None:
        """The kill switch as last read, read again once STOP_READ_SECONDS old (real time, not
        the run's clock, which tests may freeze). Measured from before the read began, so that
        `set_stop`, which waits as long, returns only when every run's next read will see it."""
        with self._lock:
            if self._stop is not None or time.monotonic() < self._stop_read_until:
                return self._stop
        began = time.monotonic()
        stop = self._store.stop_state()
        with self._lock:
            self._stop = self._stop or stop
            self._stop_read_until = max(self._stop_read_until, began + STOP_READ_SECONDS)
            return self._stop

    def start_refusal(self) -> str | None:
        """Why a host that has not started yet must not start (also the breaker, failed batch,
        a closed maintenance window)."""
        return self.halt_reason() or self.abort_reason or self._window_refusal()

    def _window_refusal(self) -> str | None:
        if self._window is None or self._window_end is None or self._clock() < self._window_end:
            return None
        self.abort(f"maintenance window of {format_duration(self._window)} closed: hosts not "
                   "started are left for next time")
        return self.abort_reason

    def bound(self, timeout: float) -> float:
        """A step's timeout, cut so that no step outlives the run's own deadline."""
        return max(1.0, min(timeout, self._deadline - self._clock()))

    def host_finished(self, host: str, status: HostStatus, *, contained: bool = False) -> None:
        """`contained`: the host failed only in steps marked `on_failure: continue` (checks
        that alert): reported as failed, but it neither trips the breaker nor stops a rollout,
        because it says nothing about whether this run's changes are safe."""
        if contained:
            with self._lock:
                self.contained_failures.add(host)
        elif status in _HOST_FAILURES:
            with self._lock:
                self._failures += 1
                tripped = self._max_failures is not None and self._failures > self._max_failures
            if tripped:
                self.abort(f"circuit breaker: {self._failures} hosts failed, more than "
                           f"max_failures={self._max_failures}; no new host starts")
        self.emit(host, None, status)

    def emit(self, host: str, step: str | None, status: HostStatus | StepStatus) -> None:
        if self._observer is not None:
            self._observer(Event(self.run_id, host, step, status))
