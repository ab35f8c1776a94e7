"""The run store's view of processes: which runs and hosts a live process holds.

A part of `RunStore` (it inherits this class). A run whose process died (kill -9, OOM, reboot)
is still `running` in the file; `reap_interrupted` recognises it by its pid, that process's
start time and the boot id, and marks the run, its hosts and the step in flight `interrupted`
(or, when hosts were parked on an approval, `waiting` for a daemon to resume it). Host leases
keep a host out of two runs at once; a dead holder's lease is reclaimed.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from maintenancebot.states import HostStatus, RunStatus, StepStatus
from maintenancebot.store_records import StorePlumbing, utc_now

DIED = "in flight when the process died"


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, started: str | None, boot: str | None) -> bool:
    if boot and boot_id() and boot != boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    current = process_start(pid)
    return started is None or current is None or current == started


class ProcessTables(StorePlumbing):
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
            if row["pid"] is not None and alive(row["pid"], row["proc_start"], row["boot_id"]):
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
                (str(RunStatus.RUNNING), pid, process_start(pid), boot_id(),
                 socket.gethostname(), run_id, str(RunStatus.WAITING))).rowcount == 1
            if taken:
                self._audit(db, "run.resumed", run_id=run_id, actor=by, details={"pid": pid})
            return taken

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
                [(host, holder, runbook, me, pid, process_start(pid), boot_id(), utc_now())
                 for host in hosts])
            return {}

    def busy_hosts(self, hosts: Sequence[str]) -> dict[str, str]:
        """Which of `hosts` another live run holds now, and who (a look; takes nothing)."""
        with self._commits.read() as db:
            return self._busy(db, hosts, socket.gethostname(), reclaim=False)

    def _busy(self, db: sqlite3.Connection, hosts: Sequence[str], me: str, *,
              reclaim: bool) -> dict[str, str]:
        busy: dict[str, str] = {}
        for host in hosts:
            row = db.execute("SELECT * FROM host_leases WHERE host = ?", (host,)).fetchone()
            if row is None:
                continue
            if row["controller"] in (None, me) and not alive(
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
            dead = row["controller"] in (None, me) and row["pid"] is not None and not alive(
                row["pid"], row["proc_start"], row["boot_id"])
            leased = db.execute("SELECT 1 FROM host_leases WHERE holder = ?",
                                (f"run {row['id']}",)).fetchone()
            if not dead and not leased:  # a leased run's hosts were counted above
                busy[row["host"]] = f"run {row['id']}"
        return busy

    def release_hosts(self, holder: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM host_leases WHERE holder = ?", (holder,))


def _interrupt_steps_in_flight(db: sqlite3.Connection, run_id: str, now: str) -> None:
    db.execute("UPDATE steps SET status = ?, error = ?, finished_at = ? "
               "WHERE run_id = ? AND status = ?",
               (str(StepStatus.INTERRUPTED), DIED, now, run_id, str(StepStatus.RUNNING)))
