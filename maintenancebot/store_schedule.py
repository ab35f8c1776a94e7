"""The run store's schedule and metrics: the daemon's fire decisions and the /metrics totals.

A part of `RunStore` (it inherits this class). `schedule_state.handled_until` is the newest fire
time of each runbook that has a decision, so a restart knows what it missed without in-memory
state; UNIQUE(runbook, fire_time) makes a second decision on one fire fail in SQLite instead of
running the runbook twice.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from maintenancebot.states import HostStatus, RunStatus, StepStatus
from maintenancebot.store_records import FireRecord, StoreMetrics, StorePlumbing, from_iso, utc_now


class ScheduleTables(StorePlumbing):
    # ------------------------------------------------------------------------------ schedule

    def handled_until(self, runbook: str) -> datetime | None:
        """The newest fire time of `runbook` that already has a decision (None: never seen)."""
        rows = self._query("SELECT handled_until FROM schedule_state WHERE runbook = ?",
                           (runbook,))
        return from_iso(rows[0]["handled_until"]) if rows else None

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
                           fire_time=from_iso(r["fire_time"]) or datetime.now(UTC),
                           decided_at=from_iso(r["decided_at"]) or datetime.now(UTC),
                           decision=r["decision"], reason=r["reason"], run_id=r["run_id"])
                for r in reversed(rows)]

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
        success = {r[0]: from_iso(r[1]) or datetime.now(UTC) for r in self._query(
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


def _advance(db: sqlite3.Connection, runbook: str, moment: datetime) -> None:
    value = moment.astimezone(UTC).isoformat()
    row = db.execute("SELECT handled_until FROM schedule_state WHERE runbook = ?",
                     (runbook,)).fetchone()
    if row is None or datetime.fromisoformat(row["handled_until"]) < moment:
        db.execute("INSERT OR REPLACE INTO schedule_state (runbook, handled_until, updated_at) "
                   "VALUES (?,?,?)", (runbook, value, utc_now()))
