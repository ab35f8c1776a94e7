"""The run store: every run, host, step, approval and audit event, in one SQLite file.

The only module that touches SQLite. Each write is committed and synced (WAL,
synchronous=FULL) before it returns, so a reader in another process, or the next start after a
crash, sees every state change the engine made before its next action; concurrent writes share
one COMMIT (`store_commit`), so hosts do not queue for one fsync each. Everything text that came
from a host, a runbook or a user passes the redactor before it is written: the database never
holds a secret.

The tables of one concern each live in a mixin `RunStore` inherits: approvals
(`store_approvals`), processes, crash reaping and leases (`store_process`), the schedule and
metrics (`store_schedule`); the schema is `store_schema`, the records `store_records`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

from maintenancebot.errors import NotFound, StoreError
from maintenancebot.states import HostStatus, RunStatus, StepStatus
from maintenancebot.store_approvals import ApprovalTables
from maintenancebot.store_commit import GroupCommit
from maintenancebot.store_process import DIED, ProcessTables, boot_id, process_start
from maintenancebot.store_records import (
    AuditRecord,
    FireRecord,
    HostRecord,
    RunRecord,
    StepRecord,
    StopState,
    StoreMetrics,
    from_iso,
    new_run_id,
    utc_now,
    where,
)
from maintenancebot.store_schedule import ScheduleTables
from maintenancebot.store_schema import MIGRATIONS, SCHEMA_VERSION

# The records are the store's vocabulary: importable from here, wherever they are defined.
__all__ = [
    "DIED", "TAIL_CHARS", "AuditRecord", "FireRecord", "HostRecord", "RunRecord",
    "RunStore", "StepRecord", "StopState", "StoreMetrics", "new_run_id", "utc_now",
]

TAIL_CHARS = 8192          # stdout/stderr kept per step: enough to say why, bounded per row
BUSY_TIMEOUT_MS = 30_000   # a daemon and a CLI may write at once; WAL makes waits short
# How stale a run's view of the kill switch may be. Read before every step of every host, it was
# a query each, queued behind the store's commits: ~3% of a 50-host run.
STOP_READ_SECONDS = 0.1

Redact = Callable[[str], str]

DB_NAME = "maintenancebot.db"  # in the state directory
LATEST = "latest"  # what `show`, `notify` and `trash` take for the run started last

# ----------------------------------------------------------------------------------- store


class RunStore(ApprovalTables, ProcessTables, ScheduleTables):
    """Thread-safe: the engine's host threads share one connection behind one lock.

    The mixins' tables share its connection and its rules (see the module's docstring)."""

    @classmethod
    def of_state_dir(cls, state_dir: str | Path) -> RunStore:
        """The store of a state directory, with runs left behind by a dead process marked
        interrupted."""
        store = cls(Path(state_dir).expanduser() / DB_NAME)
        store.reap_interrupted()
        return store

    def __init__(self, path: Path | str, redact: Redact | None = None) -> None:
        self.path = Path(path)
        self._redact: Redact = redact or (lambda text: text)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                # Step output can be sensitive even redacted; only the bot's user reads it.
                self.path.touch(mode=0o600)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the run store: {exc.strerror or exc} "
                             "(is `state_dir` in the config right, and writable?)") from exc
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
            try:
                self._commits.close()
            finally:
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
                for statement in _statements(MIGRATIONS[number]):
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic write, committed and synced when the block is left (see store_commit).

        `wait=False` for a record that gates nothing on a host (an outcome, a status): the next
        waiting write commits it first. Redact before entering: the block holds the store's lock.
        A write of one statement takes `self._commits.execute`, a third of the calls into SQLite."""
        with self._commits.write(wait=wait) as db:
            yield db

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._commits.read() as db:
            return db.execute(sql, params).fetchall()

    def _text(self, value: str | None, tail: bool = False) -> str | None:
        if value is None:
            return None
        text = self._redact(str(value))
        return text[-TAIL_CHARS:] if tail else text

    def _json(self, value: Any) -> str | None:
        if value is None:
            return None
        return json.dumps(self._redact_obj(value), sort_keys=True, default=str)

    def as_recorded(self, value: Any) -> Any:
        """`value` (a string, or nested dicts and lists) as this store would write it."""
        return self._redact_obj(value)

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
                 socket.gethostname(), pid, process_start(pid), boot_id(),
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
        """A run by id, by an unambiguous prefix of it (as `git` takes commit prefixes), or
        `latest`: the run started last (ids start with a date, so no prefix reads `latest`)."""
        if run_id == LATEST:
            rows = self._query("SELECT * FROM runs ORDER BY started_at DESC, id DESC LIMIT 1")
            if not rows:
                raise NotFound("no run recorded yet")
            return _run(rows[0])
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
        clause, params = where(runbook=runbook, status=status)
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
        error = self._text(error)
        values: tuple[Any, ...]
        if status is HostStatus.WAITING:
            sql = "UPDATE hosts SET status = ?, error = ? WHERE run_id = ? AND host = ?"
            values = (str(status), error, run_id, host)
        elif status is HostStatus.RUNNING:
            sql = ("UPDATE hosts SET status = ?, error = NULL, started_at = "
                   "COALESCE(started_at, ?) WHERE run_id = ? AND host = ?")
            values = (str(status), now, run_id, host)
        else:
            sql = ("UPDATE hosts SET status = ?, error = ?, finished_at = ? "
                   "WHERE run_id = ? AND host = ?")
            values = (str(status), error, now, run_id, host)
        self._commits.execute(sql, values, wait=status is HostStatus.WAITING)

    def get_hosts(self, run_id: str) -> list[HostRecord]:
        rows = self._query("SELECT * FROM hosts WHERE run_id = ? ORDER BY position", (run_id,))
        return [HostRecord(run_id=r["run_id"], host=r["host"], address=r["address"],
                           status=HostStatus(r["status"]), error=r["error"],
                           started_at=from_iso(r["started_at"]), finished_at=from_iso(r["finished_at"]))
                for r in rows]

    # ------------------------------------------------------------------------------ steps

    def step_started(self, run_id: str, host: str, idx: int, name: str, *, kind: str = "step",
                     command: str | None) -> int:
        """Written, and on disk, before the step's command leaves for the host; returns the row id."""
        return self.step_starting(run_id, host, idx, name, kind=kind, command=command)()

    def step_starting(self, run_id: str, host: str, idx: int, name: str, *, kind: str = "step",
                      command: str | None) -> Callable[[], int]:
        """`step_started` in two halves: the row is written now (not yet committed), and the
        callable returned waits until it is on disk and gives its id. Nothing of the step may
        happen on the host before the callable has returned; preparing may (opening the SSH
        channel overlaps the fsync)."""
        return self._commits.submit(
            "INSERT INTO steps (run_id, host, idx, name, kind, command, status, started_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (run_id, host, idx, name, kind, self._text(command), str(StepStatus.RUNNING),
             utc_now())).result

    def step_finished(
        self, step_id: int, status: StepStatus, *, rc: int | None = None,
        changed: bool | None = None, stdout: str | None = None, stderr: str | None = None,
        error: str | None = None, details: dict[str, Any] | None = None,
    ) -> None:
        values = (str(status), rc, None if changed is None else int(changed),
                  self._text(stdout, tail=True), self._text(stderr, tail=True),
                  self._text(error), self._json(details), utc_now(), step_id)
        self._commits.execute(  # what already happened gates nothing: no wait
            "UPDATE steps SET status = ?, rc = ?, changed = ?, stdout_tail = ?, stderr_tail = ?,"
            " error = ?, details = ?, finished_at = ? WHERE id = ?", values, wait=False)

    def record_step(
        self, run_id: str, host: str, idx: int, name: str, status: StepStatus, *,
        kind: str = "step", command: str | None = None, reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """A step settled without running (skipped, would run, unknown, denied ...)."""
        now = utc_now()
        waiting = status is StepStatus.WAITING
        values = (run_id, host, idx, name, kind, self._text(command), str(status),
                  self._text(reason), self._json(details), now, None if waiting else now)
        return self._commits.execute(  # only a parked step's record gates anything
            "INSERT INTO steps (run_id, host, idx, name, kind, command, status, error, details,"
            " started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values, wait=waiting)

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
        return [AuditRecord(id=r["id"], at=from_iso(r["at"]) or datetime.now(UTC),
                            action=r["action"], run_id=r["run_id"], host=r["host"],
                            actor=r["actor"], details=json.loads(r["details"] or "{}"))
                for r in rows]

    # ------------------------------------------------------------------------------ kill switch

    def set_stop(self, reason: str, by: str | None) -> None:
        """The kill switch: no new run starts, running ones start no new host or step.

        Runs read the switch at most every STOP_READ_SECONDS (`RunControl`), so this returns
        only after that long: a step that starts once it has returned has seen the switch."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO control (key, value, by, at) VALUES "
                       "('stop', ?, ?, ?)", (self._text(reason), self._text(by), utc_now()))
            self._audit(db, "stop.set", actor=by, details={"reason": self._text(reason)})
        time.sleep(STOP_READ_SECONDS)

    def clear_stop(self, by: str | None) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM control WHERE key = 'stop'")
            self._audit(db, "stop.cleared", actor=by)

    def stop_state(self) -> StopState | None:
        rows = self._query("SELECT value, by, at FROM control WHERE key = 'stop'")
        if not rows:
            return None
        return StopState(reason=rows[0]["value"], by=rows[0]["by"],
                         at=from_iso(rows[0]["at"]) or datetime.now(UTC))

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
# ----------------------------------------------------------------------------------- rows
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

def _run(r: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=r["id"], runbook=r["runbook"], runbook_path=r["runbook_path"],
        runbook_hash=r["runbook_hash"], git_commit=r["git_commit"],
        git_dirty=None if r["git_dirty"] is None else bool(r["git_dirty"]),
        dry_run=bool(r["dry_run"]), status=RunStatus(r["status"]), started_by=r["started_by"],
        selection=r["selection"], started_at=from_iso(r["started_at"]) or datetime.now(UTC),
        finished_at=from_iso(r["finished_at"]), reason=r["reason"], controller=r["controller"],
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
        started_at=from_iso(r["started_at"]), finished_at=from_iso(r["finished_at"]),
        details=json.loads(r["details"] or "{}"),
    )
