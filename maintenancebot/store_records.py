"""What the run store hands out: its records, and the base its table mixins share.

Plain frozen dataclasses built from rows; nothing here touches the database.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from maintenancebot.states import HostStatus, RunStatus, StepStatus

if TYPE_CHECKING:
    import sqlite3
    import threading

    from maintenancebot.store_commit import GroupCommit


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, readable in a Slack thread, unique: `20261123-031500-ab12cd`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")




@dataclass(frozen=True)
class RunRecord:
    id: str
    runbook: str
    runbook_path: str | None
    runbook_hash: str | None
    git_commit: str | None
    git_dirty: bool | None
    dry_run: bool
    status: RunStatus
    started_by: str | None
    selection: str | None
    started_at: datetime
    finished_at: datetime | None
    reason: str | None
    controller: str | None
    pid: int | None
    meta: dict[str, Any]
    summary_text: str | None
    summary_source: str | None
    notify_state: str | None
    notify_error: str | None


@dataclass(frozen=True)
class HostRecord:
    run_id: str
    host: str
    address: str | None
    status: HostStatus
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class StepRecord:
    id: int
    run_id: str
    host: str
    idx: int
    name: str
    kind: str
    command: str | None
    status: StepStatus
    rc: int | None
    changed: bool | None
    stdout_tail: str | None
    stderr_tail: str | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    details: dict[str, Any]


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    action: str
    run_id: str | None
    host: str | None
    actor: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class FireRecord:
    """What the daemon decided about one scheduled fire time of a runbook."""

    id: int
    runbook: str
    fire_time: datetime
    decided_at: datetime
    decision: str  # started | late | skipped | missed | failed
    reason: str | None
    run_id: str | None


@dataclass(frozen=True)
class StoreMetrics:
    runs: dict[tuple[str, bool, str], int]           # (runbook, dry_run, status) -> runs
    hosts_failed: dict[str, int]                     # runbook -> failed or unreachable hosts
    step_seconds: dict[str, tuple[float, int]]       # runbook -> (sum of durations, steps)
    last_success: dict[str, datetime]                # runbook -> finish of its last green run
    decisions: dict[tuple[str, str], int]            # (runbook, decision) -> fires
    llm_tokens: int
    approvals_pending: dict[str, int] = field(default_factory=dict)  # runbook -> hosts waiting


@dataclass(frozen=True)
class StopState:
    reason: str
    by: str | None
    at: datetime


def from_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def where(**equal: object) -> tuple[str, list[object]]:
    """`WHERE a = ? AND b = ?` and its parameters, for the filters that are not None."""
    given = {column: value for column, value in equal.items() if value is not None}
    clause = " AND ".join(f"{column} = ?" for column in given)
    return (f"WHERE {clause}" if clause else ""), [str(v) for v in given.values()]


class StorePlumbing:
    """What the store's table mixins (`store_approvals`, `store_process`, `store_schedule`)
    use of `RunStore`: its connection, lock, transactions, redaction and audit."""

    if TYPE_CHECKING:  # provided by RunStore
        _redact: Callable[[str], str]
        _lock: threading.RLock
        _db: sqlite3.Connection
        _commits: GroupCommit

        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...
        def _text(self, value: str | None, tail: bool = False) -> str | None: ...
        def _json(self, value: Any) -> str | None: ...
        def _audit(self, db: sqlite3.Connection, action: str, *, run_id: str | None = None,
                   host: str | None = None, actor: str | None = None,
                   details: dict[str, Any] | None = None) -> None: ...
