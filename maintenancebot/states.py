"""Run, host and step states and the transitions allowed between them.

The engine changes a state only through `transition`, so an impossible move (a finished step
starting again, a failed run turning green) is a bug that surfaces at once instead of a record
that lies. The store records every transition it is handed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

S = TypeVar("S", bound=StrEnum)


class RunStatus(StrEnum):
    RUNNING = "running"
    # Hosts are parked on an approval and no process holds the run (`run --no-wait`, a crash,
    # a daemon restart): the daemon picks it up and resumes it from the parked steps.
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


class HostStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # parked at a step that needs approval
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    NOT_STARTED = "not_started"  # the breaker, kill switch or run timeout kept it from starting
    INTERRUPTED = "interrupted"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # for an approval; then it runs, or is denied
    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    DENIED = "denied"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    INTERRUPTED = "interrupted"
    # dry-run outcomes: what a real run would do, never guessed
    WOULD_RUN = "would_run"
    UNKNOWN = "unknown"
    NEEDS_APPROVAL = "needs_approval"
    REFUSED = "refused"


TERMINAL_RUN = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.ABORTED, RunStatus.INTERRUPTED}
TERMINAL_HOST = {
    HostStatus.SUCCEEDED, HostStatus.FAILED, HostStatus.UNREACHABLE,
    HostStatus.NOT_STARTED, HostStatus.INTERRUPTED,
}

_RUN_MOVES: dict[RunStatus, set[RunStatus]] = {
    RunStatus.RUNNING: TERMINAL_RUN | {RunStatus.WAITING},
    RunStatus.WAITING: {RunStatus.RUNNING, RunStatus.INTERRUPTED},
}
_HOST_MOVES: dict[HostStatus, set[HostStatus]] = {
    HostStatus.PENDING: {HostStatus.RUNNING, HostStatus.NOT_STARTED, HostStatus.INTERRUPTED},
    HostStatus.RUNNING: (TERMINAL_HOST - {HostStatus.NOT_STARTED}) | {HostStatus.WAITING},
    HostStatus.WAITING: {HostStatus.RUNNING, HostStatus.INTERRUPTED},
}
_DRY = {StepStatus.WOULD_RUN, StepStatus.UNKNOWN, StepStatus.NEEDS_APPROVAL, StepStatus.REFUSED}
_STEP_MOVES: dict[StepStatus, set[StepStatus]] = {
    StepStatus.PENDING: {StepStatus.RUNNING, StepStatus.SKIPPED, StepStatus.DENIED,
                         StepStatus.INTERRUPTED, StepStatus.WAITING} | _DRY,
    StepStatus.WAITING: {StepStatus.RUNNING, StepStatus.DENIED, StepStatus.INTERRUPTED},
    StepStatus.RUNNING: {StepStatus.OK, StepStatus.FAILED, StepStatus.TIMED_OUT,
                         StepStatus.INTERRUPTED},
    StepStatus.OK: {StepStatus.ROLLED_BACK, StepStatus.ROLLBACK_FAILED},
}


class TransitionError(RuntimeError):
    """A state change the tables do not allow: a bug in the engine, never user input."""


def transition(current: S, new: S) -> S:
    """Return `new` if moving from `current` is allowed, else raise TransitionError."""
    table: dict[StrEnum, set[StrEnum]]
    if isinstance(current, RunStatus):
        table = _RUN_MOVES  # type: ignore[assignment]
    elif isinstance(current, HostStatus):
        table = _HOST_MOVES  # type: ignore[assignment]
    else:
        table = _STEP_MOVES  # type: ignore[assignment]
    if new not in table.get(current, set()):
        raise TransitionError(f"{type(current).__name__}: {current} -> {new} is not allowed")
    return new
