"""The run store: every run, host, step, approval and audit event, in one SQLite file.

The only module that touches SQLite. Each write is committed and synced (WAL,
synchronous=FULL) before it returns, so a reader in another process, or the next start after a
crash, sees every state change the engine made before its next action; concurrent writes share
one COMMIT (`store_commit`), so hosts do not queue for one fsync each. Everything text that came
from a host, a runbook or a user passes the redactor before it is written: the database never
holds a secret.

A run whose process died (kill -9, OOM, reboot) is still `running` in the file; `reap_interrupted`
recognises it by its pid, that process's start time and the boot id, and marks the run, its hosts
and the step that was in flight `interrupted`. Nothing is re-run.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

from maintenancebot.errors import MaintenanceBotError, NotFound, StoreError
from maintenancebot.states import HostStatus, RunStatus, StepStatus
from maintenancebot.store_approvals import ApprovalTables
from maintenancebot.store_commit import GroupCommit

TAIL_CHARS = 8192          # stdout/stderr kept per step: enough to say why, bounded per row
BUSY_TIMEOUT_MS = 30_000   # a daemon and a CLI may write at once; WAL makes waits short
DIED = "in flight when the process died"

Redact = Callable[[str], str]

# Each entry moves the schema one version up; never edit a released entry, append a new one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_path  TEXT,
        runbook_hash  TEXT,
        git_commit    TEXT,
        git_dirty     INTEGER,
        dry_run       INTEGER NOT NULL,
        status        TEXT NOT NULL,
        started_by    TEXT,
        selection     TEXT,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        reason        TEXT,
        controller    TEXT,
        pid           INTEGER,
        proc_start    TEXT,
        boot_id       TEXT,
        meta          TEXT,
        summary_text  TEXT,
        summary_source TEXT,
        notify_state  TEXT,
        notify_error  TEXT
    );
    CREATE INDEX runs_by_start ON runs(started_at);
    CREATE INDEX runs_by_runbook ON runs(runbook, started_at);
    CREATE INDEX runs_by_status ON runs(status);

    CREATE TABLE hosts (
        run_id      TEXT NOT NULL REFERENCES runs(id),
        host        TEXT NOT NULL,
        address     TEXT,
        position    INTEGER NOT NULL,
        status      TEXT NOT NULL,
        error       TEXT,
        started_at  TEXT,
        finished_at TEXT,
        PRIMARY KEY (run_id, host)
    );

    CREATE TABLE steps (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      TEXT NOT NULL REFERENCES runs(id),
        host        TEXT NOT NULL,
        idx         INTEGER NOT NULL,
        name        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        command     TEXT,
        status      TEXT NOT NULL,
        rc          INTEGER,
        changed     INTEGER,
        stdout_tail TEXT,
        stderr_tail TEXT,
        error       TEXT,
        started_at  TEXT,
        finished_at TEXT,
        details     TEXT
    );
    CREATE INDEX steps_by_run ON steps(run_id, host, id);
    CREATE INDEX steps_by_status ON steps(status);

    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL,
        action  TEXT NOT NULL,
        run_id  TEXT,
        host    TEXT,
        actor   TEXT,
        details TEXT
    );
    CREATE INDEX audit_by_run ON audit(run_id, id);
    -- Append-only: the trail of who did what must survive whoever wants to rewrite it.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;

    CREATE TABLE control (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        by    TEXT,
        at    TEXT NOT NULL
    );

    CREATE TABLE llm_usage (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id            TEXT NOT NULL,
        at                TEXT NOT NULL,
        day               TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL
    );
    CREATE INDEX llm_usage_by_day ON llm_usage(day);
    CREATE INDEX llm_usage_by_run ON llm_usage(run_id);
    """,
    # The daemon's schedule. `schedule_state.handled_until` is the newest fire time of each
    # runbook that has a decision, so a restart knows what it missed without in-memory state;
    # UNIQUE(runbook, fire_time) makes a second decision on one fire (a restart, a second
    # daemon) fail in SQLite instead of running the runbook twice. `host_leases` keeps a host
    # out of two daemon runs at once; the holder's pid/start time/boot id let a dead holder's
    # lease be reclaimed.
    """
    CREATE TABLE schedule_state (
        runbook       TEXT PRIMARY KEY,
        handled_until TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );

    CREATE TABLE schedule_fires (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        runbook    TEXT NOT NULL,
        fire_time  TEXT NOT NULL,
        decided_at TEXT NOT NULL,
        decision   TEXT NOT NULL,
        reason     TEXT,
        run_id     TEXT,
        UNIQUE (runbook, fire_time)
    );
    CREATE INDEX schedule_fires_by_decided ON schedule_fires(decided_at);

    CREATE TABLE host_leases (
        host        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        runbook     TEXT NOT NULL,
        controller  TEXT,
        pid         INTEGER NOT NULL,
        proc_start  TEXT,
        boot_id     TEXT,
        acquired_at TEXT NOT NULL
    );
    """,
    # Approval gates (DESIGN §5). A request groups the hosts parked at one step of one run;
    # each host has its own decision (approve may release a subset) and the digest of what it
    # would run, so an answer binds to what was shown. Every vote is kept, counted or not.
    # `slack_seen` remembers signed Slack deliveries so a replay is refused.
    """
    CREATE TABLE approvals (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      TEXT NOT NULL REFERENCES runs(id),
        runbook     TEXT NOT NULL,
        step_index  INTEGER NOT NULL,
        step_name   TEXT NOT NULL,
        status      TEXT NOT NULL,
        quorum      INTEGER NOT NULL,
        on_deny     TEXT NOT NULL,
        started_by  TEXT,
        rollback    TEXT,
        opened_at   TEXT NOT NULL,
        deadline    TEXT NOT NULL,
        remind_at   TEXT,
        reminded_at TEXT,
        closed_at   TEXT,
        closed_noticed INTEGER NOT NULL DEFAULT 0,
        notice      TEXT
    );
    CREATE INDEX approvals_by_status ON approvals(status);
    CREATE INDEX approvals_by_run ON approvals(run_id, step_index);

    CREATE TABLE approval_hosts (
        approval_id INTEGER NOT NULL REFERENCES approvals(id),
        host        TEXT NOT NULL,
        step_row    INTEGER,
        digest      TEXT NOT NULL,
        command     TEXT,
        why         TEXT,
        preview     TEXT,
        decision    TEXT,
        decided_at  TEXT,
        decided_by  TEXT,
        channel     TEXT,
        reason      TEXT,
        PRIMARY KEY (approval_id, host)
    );

    CREATE TABLE approval_votes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        approval_id INTEGER NOT NULL REFERENCES approvals(id),
        host        TEXT NOT NULL,
        vote        TEXT NOT NULL,
        voter       TEXT NOT NULL,
        channel     TEXT NOT NULL,
        at          TEXT NOT NULL,
        reason      TEXT,
        counted     INTEGER NOT NULL
    );
    CREATE INDEX approval_votes_by_request ON approval_votes(approval_id, host);

    CREATE TABLE slack_seen (
        key TEXT PRIMARY KEY,
        at  TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, readable in a Slack thread, unique: `20261123-031500-ab12cd`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------------- records


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


class HostsBusy(MaintenanceBotError):
    """Hosts of a run are in another live run: nothing started (DESIGN §5, Overlap)."""

    def __init__(self, busy: dict[str, str]) -> None:
        self.busy = busy
        super().__init__("hosts are in another run, nothing started: " + ", ".join(
            f"{host} (held by {holder})" for host, holder in sorted(busy.items())))


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


# ----------------------------------------------------------------------------------- process


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None, boot: str | None) -> bool:
    if boot and _boot_id() and boot != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    current = _process_start(pid)
    return started is None or current is None or current == started


# ----------------------------------------------------------------------------------- store


class RunStore(ApprovalTables):
    """Thread-safe: the engine's host threads share one connection behind one lock.

    Approval requests and votes live in `store_approvals` (same connection, same rules)."""

    def __init__(self, path: Path | str, redact: Redact | None = None) -> None:
        self.path = Path(path)
        self._redact: Redact = redact or (lambda text: text)
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # Step output can be sensitive even redacted; only the bot's user reads it.
            self.path.touch(mode=0o600)
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._commits = GroupCommit(self._db, self._lock)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._wal()
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot open the run store: {exc}") from exc

    def _wal(self) -> None:
        """Switching to WAL needs a moment alone with the file, and SQLite does not wait for
        it with the busy timeout: two processes opening a new store at once retry here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def set_redactor(self, redact: Redact) -> None:
        """Use `redact` from now on: each run knows its own secrets (inventory, environment)."""
        self._redact = redact

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._commits.close()
            self._db.close()

    # ------------------------------------------------------------------------------ plumbing

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this maintenancebot "
                    f"understands ({SCHEMA_VERSION}); upgrade maintenancebot, do not downgrade")
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(_MIGRATIONS[number]):
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic write, committed and synced when the block is left (see store_commit)."""
        with self._commits.write() as db:
            yield db

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _text(self, value: str | None, tail: bool = False) -> str | None:
        if value is None:
            return None
        text = self._redact(str(value))
        return text[-TAIL_CHARS:] if tail else text

    def _json(self, value: Any) -> str | None:
        if value is None:
            return None
        return json.dumps(self._redact_obj(value), sort_keys=True, default=str)

    def _redact_obj(self, value: Any) -> Any:
        redact_obj = getattr(self._redact, "redact_obj", None)
        if redact_obj is not None:
            return redact_obj(value)
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {str(k): self._redact_obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact_obj(v) for v in value]
        return value

    # ------------------------------------------------------------------------------ runs

    def create_run(
        self, run_id: str, *, runbook: str, runbook_path: str | None, runbook_hash: str | None,
        dry_run: bool, started_by: str | None, selection: str | None,
        hosts: Sequence[tuple[str, str | None]], git_commit: str | None = None,
        git_dirty: bool | None = None, meta: dict[str, Any] | None = None,
    ) -> None:
        """The run and all its hosts (pending), written before anything touches a host."""
        now = utc_now()
        pid = os.getpid()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (id, runbook, runbook_path, runbook_hash, git_commit, git_dirty,"
                " dry_run, status, started_by, selection, started_at, controller, pid,"
                " proc_start, boot_id, meta) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, runbook, runbook_path, runbook_hash, git_commit,
                 None if git_dirty is None else int(git_dirty), int(dry_run),
                 str(RunStatus.RUNNING), self._text(started_by), self._text(selection), now,
                 socket.gethostname(), pid, _process_start(pid), _boot_id(),
                 self._json(meta or {})))
            db.executemany(
                "INSERT INTO hosts (run_id, host, address, position, status) VALUES (?,?,?,?,?)",
                [(run_id, name, address, position, str(HostStatus.PENDING))
                 for position, (name, address) in enumerate(hosts)])
            self._audit(db, "run.started", run_id=run_id, actor=started_by,
                        details={"runbook": runbook, "dry_run": dry_run, "hosts": len(hosts)})

    def finish_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status = ?, reason = ?, finished_at = ? WHERE id = ?",
                       (str(status), self._text(reason), utc_now(), run_id))
            self._audit(db, "run.finished", run_id=run_id,
                        details={"status": str(status), "reason": self._text(reason)})

    def set_summary(self, run_id: str, text: str, source: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET summary_text = ?, summary_source = ? WHERE id = ?",
                       (self._text(text), source, run_id))

    def set_notify(self, run_id: str, state: str, error: str | None = None) -> None:
        """Whether the run's report reached its channels (sent / failed / skipped)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET notify_state = ?, notify_error = ? WHERE id = ?",
                       (state, self._text(error), run_id))

    def get_run(self, run_id: str) -> RunRecord:
        """A run by id or by an unambiguous prefix of it (as `git` takes commit prefixes)."""
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows and run_id:
            pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self._query("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 3",
                               (pattern,))
        if not rows:
            raise NotFound(f"no run {run_id!r} (see `maintenancebot history`)")
        if len(rows) > 1:
            raise NotFound(f"run id prefix {run_id!r} is ambiguous: "
                           + ", ".join(r["id"] for r in rows) + ", ...")
        return _run(rows[0])

    def list_runs(self, limit: int = 50, runbook: str | None = None,
                  status: RunStatus | None = None) -> list[RunRecord]:
        """Newest first."""
        where, params = [], []
        if runbook is not None:
            where.append("runbook = ?")
            params.append(runbook)
        if status is not None:
            where.append("status = ?")
            params.append(str(status))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(f"SELECT * FROM runs {clause} ORDER BY started_at DESC, id DESC "
                           "LIMIT ?", (*params, limit))
        return [_run(row) for row in rows]

    def last_run(self, runbook: str, *, dry_run: bool = False) -> RunRecord | None:
        rows = self._query("SELECT * FROM runs WHERE runbook = ? AND dry_run = ? "
                           "ORDER BY started_at DESC LIMIT 1", (runbook, int(dry_run)))
        return _run(rows[0]) if rows else None

    # ------------------------------------------------------------------------------ hosts

    def set_host_status(self, run_id: str, host: str, status: HostStatus,
                        error: str | None = None) -> None:
        now = utc_now()
        with self._tx() as db:
            if status is HostStatus.WAITING:
                db.execute("UPDATE hosts SET status = ?, error = ? WHERE run_id = ? AND host = ?",
                           (str(status), self._text(error), run_id, host))
            elif status is HostStatus.RUNNING:
                db.execute("UPDATE hosts SET status = ?, error = NULL, "
                           "started_at = COALESCE(started_at, ?) WHERE run_id = ? AND host = ?",
                           (str(status), now, run_id, host))
            else:
                db.execute("UPDATE hosts SET status = ?, error = ?, finished_at = ? "
                           "WHERE run_id = ? AND host = ?",
                           (str(status), self._text(error), now, run_id, host))

    def get_hosts(self, run_id: str) -> list[HostRecord]:
        rows = self._query("SELECT * FROM hosts WHERE run_id = ? ORDER BY position", (run_id,))
        return [HostRecord(run_id=r["run_id"], host=r["host"], address=r["address"],
                           status=HostStatus(r["status"]), error=r["error"],
                           started_at=_when(r["started_at"]), finished_at=_when(r["finished_at"]))
                for r in rows]

    # ------------------------------------------------------------------------------ steps

    def step_started(self, run_id: str, host: str, idx: int, name: str, *, kind: str = "step",
                     command: str | None) -> int:
        """Written before the step's command leaves for the host; returns the row id."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO steps (run_id, host, idx, name, kind, command, status, started_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (run_id, host, idx, name, kind, self._text(command), str(StepStatus.RUNNING),
                 utc_now()))
            return int(cursor.lastrowid or 0)

    def step_finished(
        self, step_id: int, status: StepStatus, *, rc: int | None = None,
        changed: bool | None = None, stdout: str | None = None, stderr: str | None = None,
        error: str | None = None, details: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET status = ?, rc = ?, changed = ?, stdout_tail = ?,"
                " stderr_tail = ?, error = ?, details = ?, finished_at = ? WHERE id = ?",
                (str(status), rc, None if changed is None else int(changed),
                 self._text(stdout, tail=True), self._text(stderr, tail=True),
                 self._text(error), self._json(details), utc_now(), step_id))

    def record_step(
        self, run_id: str, host: str, idx: int, name: str, status: StepStatus, *,
        kind: str = "step", command: str | None = None, reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """A step settled without running (skipped, would run, unknown, denied ...)."""
        now = utc_now()
        finished = None if status is StepStatus.WAITING else now
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO steps (run_id, host, idx, name, kind, command, status, error,"
                " details, started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, host, idx, name, kind, self._text(command), str(status),
                 self._text(reason), self._json(details), now, finished))
            return int(cursor.lastrowid or 0)

    def set_step_status(self, step_id: int, status: StepStatus) -> None:
        """Re-label a finished step (ok -> rolled_back); the undo itself is its own row."""
        with self._tx() as db:
            db.execute("UPDATE steps SET status = ? WHERE id = ?", (str(status), step_id))

    def get_steps(self, run_id: str, host: str | None = None) -> list[StepRecord]:
        if host is None:
            rows = self._query(
                "SELECT s.* FROM steps s LEFT JOIN hosts h ON h.run_id = s.run_id AND "
                "h.host = s.host WHERE s.run_id = ? ORDER BY h.position, s.host, s.id", (run_id,))
        else:
            rows = self._query("SELECT * FROM steps WHERE run_id = ? AND host = ? ORDER BY id",
                               (run_id, host))
        return [_step(row) for row in rows]

    def get_step(self, step_id: int) -> StepRecord:
        rows = self._query("SELECT * FROM steps WHERE id = ?", (step_id,))
        if not rows:
            raise NotFound(f"no step row {step_id}")
        return _step(rows[0])

    def interrupted_step(self, run_id: str) -> StepRecord | None:
        """The step that was in flight when the run's process died, if any."""
        rows = self._query("SELECT * FROM steps WHERE run_id = ? AND status = ? "
                           "ORDER BY id LIMIT 1", (run_id, str(StepStatus.INTERRUPTED)))
        return _step(rows[0]) if rows else None

    # ------------------------------------------------------------------------------ crash

    def reap_interrupted(self) -> list[str]:
        """Mark runs whose process is gone as interrupted; return their ids.

        Runs started on another controller are left alone: their pid means nothing here.
        """
        me = socket.gethostname()
        reaped = []
        for row in self._query("SELECT id, pid, proc_start, boot_id, controller FROM runs "
                               "WHERE status = ?", (str(RunStatus.RUNNING),)):
            if row["controller"] not in (None, me):
                continue
            if row["pid"] is not None and _alive(row["pid"], row["proc_start"], row["boot_id"]):
                continue
            if self._has_parked_hosts(row["id"]):
                self._mark_detached(row["id"], row["pid"])
                continue
            self._mark_interrupted(row["id"], row["pid"])
            reaped.append(row["id"])
        return reaped

    def _has_parked_hosts(self, run_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM steps WHERE run_id = ? AND status = ? LIMIT 1",
                                (run_id, str(StepStatus.WAITING))))

    def _mark_detached(self, run_id: str, pid: int | None) -> None:
        """The process died while hosts were parked on an approval: the steps in flight are
        interrupted (and their hosts), the parked hosts stay parked and the run waits for a
        daemon to resume it; the open requests stay answerable."""
        now = utc_now()
        with self._tx() as db:
            _interrupt_steps_in_flight(db, run_id, now)
            db.execute("UPDATE hosts SET status = ? WHERE run_id = ? AND status IN (?, ?) AND "
                       "host IN (SELECT host FROM steps WHERE run_id = ? AND status = ?)",
                       (str(HostStatus.WAITING), run_id, str(HostStatus.RUNNING),
                        str(HostStatus.WAITING), run_id, str(StepStatus.WAITING)))
            db.execute("UPDATE hosts SET status = ?, error = COALESCE(error, ?), finished_at = ? "
                       "WHERE run_id = ? AND status = ?",
                       (str(HostStatus.INTERRUPTED), DIED, now, run_id, str(HostStatus.RUNNING)))
            db.execute("UPDATE runs SET status = ?, pid = NULL WHERE id = ?",
                       (str(RunStatus.WAITING), run_id))
            self._audit(db, "run.detached", run_id=run_id,
                        details={"pid": pid, "why": "controller died with hosts parked"})

    def detach_run(self, run_id: str, why: str) -> None:
        """No process holds this run any more; its parked hosts wait for a daemon."""
        with self._tx() as db:
            db.execute("UPDATE runs SET status = ?, pid = NULL WHERE id = ?",
                       (str(RunStatus.WAITING), run_id))
            self._audit(db, "run.detached", run_id=run_id, details={"why": why})

    def attach_run(self, run_id: str, by: str) -> bool:
        """Take a waiting run for this process; False if another process took it first."""
        pid = os.getpid()
        with self._tx() as db:
            taken = db.execute(
                "UPDATE runs SET status = ?, pid = ?, proc_start = ?, boot_id = ?, "
                "controller = ? WHERE id = ? AND status = ?",
                (str(RunStatus.RUNNING), pid, _process_start(pid), _boot_id(),
                 socket.gethostname(), run_id, str(RunStatus.WAITING))).rowcount == 1
            if taken:
                self._audit(db, "run.resumed", run_id=run_id, actor=by, details={"pid": pid})
            return taken

    def settle_waiting_step(self, step_id: int, status: StepStatus,
                            reason: str | None = None, command: str | None = None) -> None:
        """A parked step is released: `running` (it runs now, in this row), `denied` or
        `interrupted` (with the reason)."""
        now = utc_now()
        with self._tx() as db:
            if status is StepStatus.RUNNING:
                db.execute("UPDATE steps SET status = ?, started_at = ?, finished_at = NULL, "
                           "error = NULL, command = COALESCE(?, command) WHERE id = ?",
                           (str(status), now, self._text(command), step_id))
            else:
                db.execute("UPDATE steps SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                           (str(status), self._text(reason), now, step_id))

    def _mark_interrupted(self, run_id: str, pid: int | None) -> None:
        now = utc_now()
        reason = f"the controller process (pid {pid}) died mid-run; nothing was re-run"
        with self._tx() as db:
            _interrupt_steps_in_flight(db, run_id, now)
            db.execute("UPDATE hosts SET status = ?, error = COALESCE(error, ?), finished_at = ? "
                       "WHERE run_id = ? AND status IN (?, ?)",
                       (str(HostStatus.INTERRUPTED), DIED, now, run_id,
                        str(HostStatus.RUNNING), str(HostStatus.PENDING)))
            db.execute("UPDATE runs SET status = ?, reason = ?, finished_at = ? WHERE id = ?",
                       (str(RunStatus.INTERRUPTED), reason, now, run_id))
            self._audit(db, "run.interrupted", run_id=run_id, details={"pid": pid})

    # ------------------------------------------------------------------------------ audit

    def audit(self, action: str, *, run_id: str | None = None, host: str | None = None,
              actor: str | None = None, details: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            self._audit(db, action, run_id=run_id, host=host, actor=actor, details=details)

    def _audit(self, db: sqlite3.Connection, action: str, *, run_id: str | None = None,
               host: str | None = None, actor: str | None = None,
               details: dict[str, Any] | None = None) -> None:
        db.execute("INSERT INTO audit (at, action, run_id, host, actor, details) "
                   "VALUES (?,?,?,?,?,?)",
                   (utc_now(), action, run_id, host, self._text(actor), self._json(details or {})))

    def audit_log(self, run_id: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        if run_id is None:
            rows = self._query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
            rows.reverse()
        else:
            rows = self._query("SELECT * FROM audit WHERE run_id = ? ORDER BY id", (run_id,))
        return [AuditRecord(id=r["id"], at=_when(r["at"]) or datetime.now(UTC),
                            action=r["action"], run_id=r["run_id"], host=r["host"],
                            actor=r["actor"], details=json.loads(r["details"] or "{}"))
                for r in rows]

    # ------------------------------------------------------------------------------ kill switch

    def set_stop(self, reason: str, by: str | None) -> None:
        """The kill switch: no new run starts, running ones start no new host or step."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO control (key, value, by, at) VALUES "
                       "('stop', ?, ?, ?)", (self._text(reason), self._text(by), utc_now()))
            self._audit(db, "stop.set", actor=by, details={"reason": self._text(reason)})

    def clear_stop(self, by: str | None) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM control WHERE key = 'stop'")
            self._audit(db, "stop.cleared", actor=by)

    def stop_state(self) -> StopState | None:
        rows = self._query("SELECT value, by, at FROM control WHERE key = 'stop'")
        if not rows:
            return None
        return StopState(reason=rows[0]["value"], by=rows[0]["by"],
                         at=_when(rows[0]["at"]) or datetime.now(UTC))

    # ------------------------------------------------------------------------------ LLM tokens

    def used_today(self) -> int:
        rows = self._query("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                           "FROM llm_usage WHERE day = ?", (date.today().isoformat(),))
        return int(rows[0][0])

    def used_for_run(self, run_id: str) -> int:
        rows = self._query("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                           "FROM llm_usage WHERE run_id = ?", (run_id,))
        return int(rows[0][0])

    def record(self, run_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO llm_usage (run_id, at, day, prompt_tokens, completion_tokens)"
                       " VALUES (?,?,?,?,?)", (run_id, utc_now(), date.today().isoformat(),
                                               prompt_tokens, completion_tokens))


    # ------------------------------------------------------------------------------ schedule

    def handled_until(self, runbook: str) -> datetime | None:
        """The newest fire time of `runbook` that already has a decision (None: never seen)."""
        rows = self._query("SELECT handled_until FROM schedule_state WHERE runbook = ?",
                           (runbook,))
        return _when(rows[0]["handled_until"]) if rows else None

    def set_handled_until(self, runbook: str, moment: datetime) -> None:
        """Move the mark forward (never back): fires up to `moment` count as decided."""
        with self._tx() as db:
            _advance(db, runbook, moment)

    def claim_fire(self, runbook: str, fire_time: datetime, decision: str,
                   reason: str | None = None) -> int | None:
        """Record the decision on one scheduled fire; None if that fire was decided before.

        Written before the run starts, so a crash mid-run leaves a decided fire: nothing is
        re-run on restart (DESIGN §5, Crash)."""
        moment = fire_time.astimezone(UTC).isoformat()
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO schedule_fires (runbook, fire_time, decided_at, decision,"
                " reason) VALUES (?,?,?,?,?)",
                (runbook, moment, utc_now(), decision, self._text(reason)))
            if cursor.rowcount == 0:
                return None
            _advance(db, runbook, fire_time)
            self._audit(db, f"schedule.{decision}", actor="daemon",
                        details={"runbook": runbook, "fire_time": moment,
                                 "reason": self._text(reason)})
            return int(cursor.lastrowid or 0)

    def update_fire(self, fire_id: int, *, decision: str | None = None,
                    reason: str | None = None, run_id: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE schedule_fires SET decision = COALESCE(?, decision), "
                       "reason = COALESCE(?, reason), run_id = COALESCE(?, run_id) WHERE id = ?",
                       (decision, self._text(reason), run_id, fire_id))
            if decision is not None:
                self._audit(db, f"schedule.{decision}", run_id=run_id, actor="daemon",
                            details={"fire": fire_id, "reason": self._text(reason)})

    def fires(self, runbook: str | None = None, limit: int = 100) -> list[FireRecord]:
        """Schedule decisions, oldest first."""
        clause, params = ("WHERE runbook = ?", [runbook]) if runbook else ("", [])
        rows = self._query(f"SELECT * FROM schedule_fires {clause} ORDER BY id DESC LIMIT ?",
                           (*params, limit))
        return [FireRecord(id=r["id"], runbook=r["runbook"],
                           fire_time=_when(r["fire_time"]) or datetime.now(UTC),
                           decided_at=_when(r["decided_at"]) or datetime.now(UTC),
                           decision=r["decision"], reason=r["reason"], run_id=r["run_id"])
                for r in reversed(rows)]

    # ------------------------------------------------------------------------------ leases

    def acquire_hosts(self, hosts: Sequence[str], holder: str, runbook: str) -> dict[str, str]:
        """Lease all of `hosts` to `holder`, or none: returns {host: who holds it} on conflict.

        All-or-nothing in one transaction, so two runs waiting for each other's hosts cannot
        deadlock. A lease whose process is gone is reclaimed (and audited); a host in a live
        run that holds no lease (one recorded by an older version) counts as held too."""
        me = socket.gethostname()
        with self._tx() as db:
            busy = self._busy(db, hosts, me, reclaim=True)
            if busy:
                return busy
            pid = os.getpid()
            db.executemany(
                "INSERT INTO host_leases (host, holder, runbook, controller, pid, proc_start,"
                " boot_id, acquired_at) VALUES (?,?,?,?,?,?,?,?)",
                [(host, holder, runbook, me, pid, _process_start(pid), _boot_id(), utc_now())
                 for host in hosts])
            return {}

    def busy_hosts(self, hosts: Sequence[str]) -> dict[str, str]:
        """Which of `hosts` another live run holds now, and who (a look; takes nothing)."""
        with self._lock:
            return self._busy(self._db, hosts, socket.gethostname(), reclaim=False)

    def _busy(self, db: sqlite3.Connection, hosts: Sequence[str], me: str, *,
              reclaim: bool) -> dict[str, str]:
        busy: dict[str, str] = {}
        for host in hosts:
            row = db.execute("SELECT * FROM host_leases WHERE host = ?", (host,)).fetchone()
            if row is None:
                continue
            if row["controller"] in (None, me) and not _alive(
                    row["pid"], row["proc_start"], row["boot_id"]):
                if reclaim:
                    db.execute("DELETE FROM host_leases WHERE host = ?", (host,))
                    self._audit(db, "lease.reclaimed", host=host,
                                details={"holder": row["holder"], "pid": row["pid"]})
            else:
                busy[host] = row["holder"]
        busy.update(self._hosts_in_live_runs(db, hosts, me))
        return busy

    def _hosts_in_live_runs(self, db: sqlite3.Connection, hosts: Sequence[str],
                            me: str) -> dict[str, str]:
        busy = {}
        wanted = set(hosts)
        for row in db.execute(
                "SELECT r.id, r.pid, r.proc_start, r.boot_id, r.controller, h.host FROM runs r "
                "JOIN hosts h ON h.run_id = r.id WHERE r.status = ? AND r.dry_run = 0",
                (str(RunStatus.RUNNING),)):
            if row["host"] not in wanted:
                continue
            dead = row["controller"] in (None, me) and row["pid"] is not None and not _alive(
                row["pid"], row["proc_start"], row["boot_id"])
            leased = db.execute("SELECT 1 FROM host_leases WHERE holder = ?",
                                (f"run {row['id']}",)).fetchone()
            if not dead and not leased:  # a leased run's hosts were counted above
                busy[row["host"]] = f"run {row['id']}"
        return busy

    def release_hosts(self, holder: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM host_leases WHERE holder = ?", (holder,))


    # ------------------------------------------------------------------------------ metrics

    def metrics(self) -> StoreMetrics:
        """Totals for the daemon's /metrics, straight from the records (nothing kept in memory,
        so a restart does not reset a counter)."""
        runs = {(r[0], bool(r[1]), r[2]): int(r[3]) for r in self._query(
            "SELECT runbook, dry_run, status, COUNT(*) FROM runs GROUP BY 1, 2, 3")}
        failed = {r[0]: int(r[1]) for r in self._query(
            "SELECT r.runbook, COUNT(*) FROM hosts h JOIN runs r ON r.id = h.run_id "
            "WHERE r.dry_run = 0 AND h.status IN (?, ?) GROUP BY 1",
            (str(HostStatus.FAILED), str(HostStatus.UNREACHABLE)))}
        steps = {r[0]: (float(r[1] or 0.0), int(r[2])) for r in self._query(
            "SELECT r.runbook, SUM((julianday(s.finished_at) - julianday(s.started_at)) * 86400),"
            " COUNT(*) FROM steps s JOIN runs r ON r.id = s.run_id WHERE s.kind = 'step' AND"
            " s.finished_at IS NOT NULL AND s.started_at IS NOT NULL AND s.status NOT IN"
            " (?, ?, ?) GROUP BY 1", (str(StepStatus.SKIPPED), str(StepStatus.WOULD_RUN),
                                      str(StepStatus.UNKNOWN)))}
        success = {r[0]: _when(r[1]) or datetime.now(UTC) for r in self._query(
            "SELECT runbook, MAX(finished_at) FROM runs WHERE status = ? AND dry_run = 0 "
            "GROUP BY 1", (str(RunStatus.SUCCEEDED),))}
        decisions = {(r[0], r[1]): int(r[2]) for r in self._query(
            "SELECT runbook, decision, COUNT(*) FROM schedule_fires GROUP BY 1, 2")}
        tokens = int(self._query("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                                 "FROM llm_usage")[0][0])
        pending = {r[0]: int(r[1]) for r in self._query(
            "SELECT a.runbook, COUNT(*) FROM approvals a JOIN approval_hosts h ON "
            "h.approval_id = a.id WHERE a.status = 'open' AND h.decision IS NULL GROUP BY 1")}
        return StoreMetrics(runs, failed, steps, success, decisions, tokens, pending)


# ----------------------------------------------------------------------------------- rows


def _interrupt_steps_in_flight(db: sqlite3.Connection, run_id: str, now: str) -> None:
    db.execute("UPDATE steps SET status = ?, error = ?, finished_at = ? "
               "WHERE run_id = ? AND status = ?",
               (str(StepStatus.INTERRUPTED), DIED, now, run_id, str(StepStatus.RUNNING)))


def _advance(db: sqlite3.Connection, runbook: str, moment: datetime) -> None:
    value = moment.astimezone(UTC).isoformat()
    row = db.execute("SELECT handled_until FROM schedule_state WHERE runbook = ?",
                     (runbook,)).fetchone()
    if row is None or datetime.fromisoformat(row["handled_until"]) < moment:
        db.execute("INSERT OR REPLACE INTO schedule_state (runbook, handled_until, updated_at) "
                   "VALUES (?,?,?)", (runbook, value, utc_now()))


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which hold `;`) whole."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _run(r: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=r["id"], runbook=r["runbook"], runbook_path=r["runbook_path"],
        runbook_hash=r["runbook_hash"], git_commit=r["git_commit"],
        git_dirty=None if r["git_dirty"] is None else bool(r["git_dirty"]),
        dry_run=bool(r["dry_run"]), status=RunStatus(r["status"]), started_by=r["started_by"],
        selection=r["selection"], started_at=_when(r["started_at"]) or datetime.now(UTC),
        finished_at=_when(r["finished_at"]), reason=r["reason"], controller=r["controller"],
        pid=r["pid"], meta=json.loads(r["meta"] or "{}"), summary_text=r["summary_text"],
        summary_source=r["summary_source"], notify_state=r["notify_state"],
        notify_error=r["notify_error"],
    )


def _step(r: sqlite3.Row) -> StepRecord:
    return StepRecord(
        id=r["id"], run_id=r["run_id"], host=r["host"], idx=r["idx"], name=r["name"],
        kind=r["kind"], command=r["command"], status=StepStatus(r["status"]), rc=r["rc"],
        changed=None if r["changed"] is None else bool(r["changed"]),
        stdout_tail=r["stdout_tail"], stderr_tail=r["stderr_tail"], error=r["error"],
        started_at=_when(r["started_at"]), finished_at=_when(r["finished_at"]),
        details=json.loads(r["details"] or "{}"),
    )
