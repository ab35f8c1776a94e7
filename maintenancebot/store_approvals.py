"""The run store's approval tables: requests, each host's decision, every vote, Slack replays.

A part of `RunStore` (it inherits this class) kept in its own file so that the SQL of one
concern reads in one place. Same connection, same rules: every write is one committed
transaction, text is redacted before it is stored, and each answer is audited in the same
transaction that records it. Decisions are made here, atomically, so two approvers clicking at
once (two processes) cannot both be "the first answer".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from maintenancebot.errors import NotFound
from maintenancebot.store_records import StorePlumbing, from_iso, where

OPEN = "open"
CLOSED = "closed"

APPROVED = "approved"
DENIED = "denied"
EXPIRED = "expired"        # the deadline passed: acts as deny
CANCELLED = "cancelled"    # the run stopped (kill switch, abort) while the host waited
SUPERSEDED = "superseded"  # the host would now run something else: it parked again anew
DECISIONS = (APPROVED, DENIED, EXPIRED, CANCELLED, SUPERSEDED)


@dataclass(frozen=True)
class ApprovalHost:
    host: str
    step_row: int | None
    digest: str
    command: str | None
    why: dict[str, Any]
    preview: dict[str, Any] | None
    decision: str | None
    decided_at: datetime | None
    decided_by: str | None
    channel: str | None
    reason: str | None
    approvals: int  # counted approve votes so far (towards the quorum)


@dataclass(frozen=True)
class Vote:
    host: str
    vote: str
    voter: str
    channel: str
    at: datetime
    reason: str | None
    counted: bool


@dataclass(frozen=True)
class ApprovalRecord:
    id: int
    run_id: str
    runbook: str
    step_index: int
    step_name: str
    status: str
    quorum: int
    on_deny: str
    started_by: str | None
    rollback: str | None
    opened_at: datetime
    deadline: datetime
    remind_at: datetime | None
    reminded_at: datetime | None
    closed_at: datetime | None
    notice: dict[str, Any]
    hosts: tuple[ApprovalHost, ...]
    votes: tuple[Vote, ...]

    @property
    def waiting(self) -> list[str]:
        return [h.host for h in self.hosts if h.decision is None]

    def entry(self, host: str) -> ApprovalHost:
        return next(h for h in self.hosts if h.host == host)


@dataclass(frozen=True)
class VoteOutcome:
    """What one answer did: hosts it decided, and hosts it found already decided."""

    decided: dict[str, str]
    already: dict[str, str]
    pending: list[str]  # approve votes counted but short of the quorum
    closed: bool


class ApprovalTables(StorePlumbing):
    def open_approval(
        self, *, run_id: str, runbook: str, step_index: int, step_name: str, quorum: int,
        on_deny: str, started_by: str | None, rollback: str | None, deadline: datetime,
        remind_at: datetime | None, hosts: Sequence[dict[str, Any]],
    ) -> int:
        """One request for `hosts` (dicts: host, step_row, digest, command, why, preview)."""
        now = _now()
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO approvals (run_id, runbook, step_index, step_name, status, quorum,"
                " on_deny, started_by, rollback, opened_at, deadline, remind_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, runbook, step_index, step_name, OPEN, quorum, on_deny,
                 self._text(started_by), self._text(rollback), _iso(now), _iso(deadline),
                 None if remind_at is None else _iso(remind_at)))
            request = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT INTO approval_hosts (approval_id, host, step_row, digest, command, why,"
                " preview) VALUES (?,?,?,?,?,?,?)",
                [(request, h["host"], h.get("step_row"), h["digest"], self._text(h.get("command")),
                  self._json(h.get("why") or {}), self._json(h.get("preview")))
                 for h in hosts])
            self._audit(db, "approval.opened", run_id=run_id, details={
                "approval": request, "step": step_name, "hosts": [h["host"] for h in hosts],
                "deadline": _iso(deadline), "quorum": quorum})
            return request

    def get_approval(self, request: int) -> ApprovalRecord:
        rows = self._query("SELECT * FROM approvals WHERE id = ?", (request,))
        if not rows:
            raise NotFound(f"no approval request {request} (see `maintenancebot approvals`)")
        return self._approval(rows[0])

    def list_approvals(self, *, status: str | None = OPEN, run_id: str | None = None,
                       limit: int = 200) -> list[ApprovalRecord]:
        """Oldest first: the request that waits longest is the one to answer first."""
        clause, params = where(status=status, run_id=run_id)
        rows = self._query(f"SELECT * FROM approvals {clause} ORDER BY id DESC LIMIT ?",
                           (*params, limit))
        return [self._approval(row) for row in reversed(rows)]

    def approval_entry(self, run_id: str, host: str,
                       step_index: int) -> tuple[ApprovalRecord, ApprovalHost] | None:
        """The newest request entry of this host at this step that is not superseded."""
        rows = self._query(
            "SELECT a.id FROM approvals a JOIN approval_hosts h ON h.approval_id = a.id "
            "WHERE a.run_id = ? AND a.step_index = ? AND h.host = ? "
            "AND (h.decision IS NULL OR h.decision != ?) ORDER BY a.id DESC LIMIT 1",
            (run_id, step_index, host, SUPERSEDED))
        if not rows:
            return None
        record = self.get_approval(int(rows[0]["id"]))
        return record, record.entry(host)

    def cast_vote(self, request: int, *, vote: str, voter: str, channel: str,
                  hosts: Sequence[str] | None = None, reason: str | None = None,
                  origin: dict[str, Any] | None = None) -> VoteOutcome:
        """Record one answer. A deny decides at once; an approve decides a host when `quorum`
        distinct voters approved it. A host already decided keeps its first answer (the vote
        is still kept, marked not counted). `hosts` None: every host still waiting."""
        assert vote in ("approve", "deny")
        now = _iso(_now())
        with self._tx() as db:
            row = db.execute("SELECT * FROM approvals WHERE id = ?", (request,)).fetchone()
            if row is None:
                raise NotFound(f"no approval request {request} (see `maintenancebot approvals`)")
            entries = {r["host"]: r for r in db.execute(
                "SELECT * FROM approval_hosts WHERE approval_id = ?", (request,))}
            unknown = sorted(set(hosts or ()) - set(entries))
            if unknown:
                raise NotFound(f"approval request {request} does not list "
                               f"{', '.join(unknown)} (it lists {', '.join(sorted(entries))})")
            targets = list(hosts) if hosts else [h for h, r in entries.items()
                                                 if r["decision"] is None] or list(entries)
            decided: dict[str, str] = {}
            already: dict[str, str] = {}
            pending: list[str] = []
            for host in targets:
                entry = entries[host]
                counted = entry["decision"] is None and not (vote == "approve" and db.execute(
                    "SELECT 1 FROM approval_votes WHERE approval_id = ? AND host = ? AND "
                    "voter = ? AND vote = 'approve' AND counted = 1",
                    (request, host, voter)).fetchone())
                db.execute("INSERT INTO approval_votes (approval_id, host, vote, voter, channel,"
                           " at, reason, counted) VALUES (?,?,?,?,?,?,?,?)",
                           (request, host, vote, self._text(voter), channel, now,
                            self._text(reason), int(counted)))
                if entry["decision"] is not None:
                    already[host] = entry["decision"]
                    continue
                if not counted:
                    pending.append(host)  # the same voter twice counts once
                    continue
                if vote == "approve":
                    votes = db.execute("SELECT COUNT(DISTINCT voter) FROM approval_votes WHERE "
                                       "approval_id = ? AND host = ? AND vote = 'approve' AND "
                                       "counted = 1", (request, host)).fetchone()[0]
                    if votes < row["quorum"]:
                        pending.append(host)
                        continue
                decision = APPROVED if vote == "approve" else DENIED
                self._decide(db, request, host, decision, voter, channel, reason, now)
                decided[host] = decision
            closed = self._close_if_done(db, request, now)
            self._audit(db, f"approval.{vote}", run_id=row["run_id"], actor=voter, details={
                "approval": request, "channel": channel, "hosts": targets,
                "decided": decided, "already_decided": already, "short_of_quorum": pending,
                "reason": self._text(reason), **(origin or {})})
            return VoteOutcome(decided, already, pending, closed)

    def close_entries(self, request: int, hosts: Sequence[str] | None, decision: str,
                      reason: str, *, by: str = "maintenancebot") -> list[str]:
        """Decide the still-waiting `hosts` (None: all) as expired/cancelled/superseded;
        returns those it decided (a host answered meanwhile keeps that answer)."""
        assert decision in (EXPIRED, CANCELLED, SUPERSEDED)
        now = _iso(_now())
        with self._tx() as db:
            row = db.execute("SELECT run_id FROM approvals WHERE id = ?", (request,)).fetchone()
            if row is None:
                raise NotFound(f"no approval request {request}")
            waiting = [r["host"] for r in db.execute(
                "SELECT host FROM approval_hosts WHERE approval_id = ? AND decision IS NULL",
                (request,)) if hosts is None or r["host"] in hosts]
            for host in waiting:
                self._decide(db, request, host, decision, by, "maintenancebot", reason, now)
            self._close_if_done(db, request, now)
            if waiting:
                self._audit(db, f"approval.{decision}", run_id=row["run_id"], actor=by,
                            details={"approval": request, "hosts": waiting,
                                     "reason": self._text(reason)})
            return waiting

    def claim_reminder(self, request: int) -> bool:
        """True exactly once per request, for whoever sends the reminder."""
        with self._tx() as db:
            return db.execute("UPDATE approvals SET reminded_at = ? WHERE id = ? AND "
                              "reminded_at IS NULL AND status = ?",
                              (_iso(_now()), request, OPEN)).rowcount == 1

    def claim_closed_notice(self, request: int) -> bool:
        """True exactly once per closed request, for whoever announces the outcome."""
        with self._tx() as db:
            return db.execute("UPDATE approvals SET closed_noticed = 1 WHERE id = ? AND "
                              "status = ? AND closed_noticed = 0",
                              (request, CLOSED)).rowcount == 1

    def set_approval_notice(self, request: int, notice: dict[str, Any]) -> None:
        """Where the request was announced (e.g. Slack channel and message ts), to update it."""
        with self._tx() as db:
            db.execute("UPDATE approvals SET notice = ? WHERE id = ?",
                       (self._json(notice), request))

    def first_sight(self, key: str) -> bool:
        """True the first time `key` is seen (a signed delivery), False for a replay."""
        with self._tx() as db:
            return db.execute("INSERT OR IGNORE INTO slack_seen (key, at) VALUES (?, ?)",
                              (key, _iso(_now()))).rowcount == 1

    # ------------------------------------------------------------------------------ rows

    def _decide(self, db: sqlite3.Connection, request: int, host: str, decision: str,
                by: str, channel: str, reason: str | None, now: str) -> None:
        db.execute("UPDATE approval_hosts SET decision = ?, decided_at = ?, decided_by = ?,"
                   " channel = ?, reason = ? WHERE approval_id = ? AND host = ? AND "
                   "decision IS NULL",
                   (decision, now, self._text(by), channel, self._text(reason), request, host))

    def _close_if_done(self, db: sqlite3.Connection, request: int, now: str) -> bool:
        waiting = db.execute("SELECT COUNT(*) FROM approval_hosts WHERE approval_id = ? AND "
                             "decision IS NULL", (request,)).fetchone()[0]
        if waiting:
            return False
        return db.execute("UPDATE approvals SET status = ?, closed_at = ? WHERE id = ? AND "
                          "status = ?", (CLOSED, now, request, OPEN)).rowcount == 1

    def _approval(self, r: sqlite3.Row) -> ApprovalRecord:
        request = int(r["id"])
        counts = {row["host"]: row["n"] for row in self._query(
            "SELECT host, COUNT(DISTINCT voter) AS n FROM approval_votes WHERE approval_id = ? "
            "AND vote = 'approve' AND counted = 1 GROUP BY host", (request,))}
        hosts = tuple(ApprovalHost(
            host=h["host"], step_row=h["step_row"], digest=h["digest"], command=h["command"],
            why=json.loads(h["why"] or "{}"),
            preview=None if h["preview"] is None else json.loads(h["preview"]),
            decision=h["decision"], decided_at=from_iso(h["decided_at"]),
            decided_by=h["decided_by"], channel=h["channel"], reason=h["reason"],
            approvals=int(counts.get(h["host"], 0)),
        ) for h in self._query("SELECT * FROM approval_hosts WHERE approval_id = ? "
                               "ORDER BY rowid", (request,)))
        votes = tuple(Vote(host=v["host"], vote=v["vote"], voter=v["voter"],
                           channel=v["channel"], at=from_iso(v["at"]) or _now(),
                           reason=v["reason"], counted=bool(v["counted"]))
                      for v in self._query("SELECT * FROM approval_votes WHERE approval_id = ? "
                                           "ORDER BY id", (request,)))
        return ApprovalRecord(
            id=request, run_id=r["run_id"], runbook=r["runbook"], step_index=r["step_index"],
            step_name=r["step_name"], status=r["status"], quorum=r["quorum"],
            on_deny=r["on_deny"], started_by=r["started_by"], rollback=r["rollback"],
            opened_at=from_iso(r["opened_at"]) or _now(), deadline=from_iso(r["deadline"]) or _now(),
            remind_at=from_iso(r["remind_at"]), reminded_at=from_iso(r["reminded_at"]),
            closed_at=from_iso(r["closed_at"]), notice=json.loads(r["notice"] or "{}"),
            hosts=hosts, votes=votes)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")
