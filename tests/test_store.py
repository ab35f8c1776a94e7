"""The run store on real SQLite files: lifecycle, crash reaping, redaction, concurrency."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maintenancebot.errors import NotFound, StoreError
from maintenancebot.redact import Redactor
from maintenancebot.runcontrol import RunControl
from maintenancebot.states import HostStatus, RunStatus, StepStatus
from maintenancebot.store import DIED, TAIL_CHARS, RunStore, StopState, new_run_id

SECRET = "hunter2-Zq8v-planted"


def start(store: RunStore, run_id: str = "20261123-010000-aaaaaa", hosts: int = 2) -> str:
    store.create_run(run_id, runbook="weekly", runbook_path="runbooks/weekly.yaml",
                     runbook_hash="ab" * 32, dry_run=False, started_by="alice",
                     selection="web", hosts=[(f"web-{i}", f"10.0.0.{i}") for i in range(hosts)])
    return run_id


def test_a_run_is_written_before_and_after_each_step(tmp_path: Path) -> None:
    db = tmp_path / "state" / "mb.db"
    with RunStore(db) as store:
        run_id = start(store)
        store.set_host_status(run_id, "web-0", HostStatus.RUNNING)
        row = store.step_started(run_id, "web-0", 0, "update", command="apt-get upgrade")
        # A second connection (another process: `maintenancebot show`) sees the step in flight.
        with RunStore(db) as reader:
            [step] = reader.get_steps(run_id)
            assert step.status == "running" and step.command == "apt-get upgrade"
            assert step.started_at is not None and step.finished_at is None
        store.step_finished(row, StepStatus.OK, rc=0, changed=True, stdout="done\n",
                            stderr="", details={"duration": 1.5})
        store.record_step(run_id, "web-0", 1, "reboot", StepStatus.SKIPPED,
                          reason="when: needs_reboot was false")
        store.set_host_status(run_id, "web-0", HostStatus.SUCCEEDED)
        store.set_host_status(run_id, "web-1", HostStatus.NOT_STARTED, "kill switch")
        store.finish_run(run_id, RunStatus.SUCCEEDED)

    with RunStore(db) as store:
        run = store.get_run(run_id)
        assert (run.status, run.started_by, run.dry_run) == (RunStatus.SUCCEEDED, "alice", False)
        assert run.finished_at is not None and run.finished_at >= run.started_at
        hosts = store.get_hosts(run_id)
        assert [(h.host, h.status, h.error) for h in hosts] == [
            ("web-0", HostStatus.SUCCEEDED, None), ("web-1", HostStatus.NOT_STARTED, "kill switch")]
        steps = store.get_steps(run_id)
        assert [(s.name, s.status, s.rc, s.changed) for s in steps] == [
            ("update", "ok", 0, True), ("reboot", "skipped", None, None)]
        assert steps[0].details == {"duration": 1.5} and steps[1].error.startswith("when:")
        assert [a.action for a in store.audit_log(run_id)] == ["run.started", "run.finished"]
    assert db.stat().st_mode & 0o777 == 0o600


def test_output_tails_are_bounded(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        run_id = start(store)
        row = store.step_started(run_id, "web-0", 0, "chatty", command="yes")
        store.step_finished(row, StepStatus.OK, stdout="x" * 100_000 + "THE END")
        [step] = store.get_steps(run_id)
        assert len(step.stdout_tail) == TAIL_CHARS and step.stdout_tail.endswith("THE END")


def test_no_planted_secret_reaches_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    store = RunStore(db, redact=Redactor([SECRET]))
    run_id = start(store)
    row = store.step_started(run_id, "web-0", 0, "login", command=f"curl -u admin:{SECRET} x")
    store.step_finished(row, StepStatus.FAILED, rc=1, stdout=f"token={SECRET}",
                        stderr=f"bad password {SECRET}", error=f"failed with {SECRET}",
                        details={"url": f"https://u:{SECRET}@example.com", "nested": [SECRET]})
    store.record_step(run_id, "web-0", 1, "x", StepStatus.SKIPPED, reason=SECRET)
    store.audit("note", run_id=run_id, details={"text": SECRET})
    store.finish_run(run_id, RunStatus.FAILED, reason=f"because {SECRET}")
    store.set_stop(f"stop {SECRET}", "bob")
    [step, _] = store.get_steps(run_id)
    assert "[REDACTED" in step.command and SECRET not in step.command
    # Read the raw bytes of the database and its write-ahead log while still open.
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("mb.db"))
    assert b"curl -u admin:" in raw, "the rows are really there"
    assert SECRET.encode() not in raw
    store.close()


def test_the_audit_log_cannot_be_rewritten(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    with RunStore(db) as store:
        store.audit("approval.granted", actor="carol", details={"step": "reboot"})
    raw = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM audit")
    raw.close()
    with RunStore(db) as store:
        assert [(a.action, a.actor) for a in store.audit_log()] == [("approval.granted", "carol")]


def test_kill_switch_round_trip_is_audited(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        assert store.stop_state() is None
        store.set_stop("incident 4711", "oncall")
        stop = store.stop_state()
        assert stop is not None and (stop.reason, stop.by) == ("incident 4711", "oncall")
        store.clear_stop("oncall")
        assert store.stop_state() is None
        assert [a.action for a in store.audit_log()] == ["stop.set", "stop.cleared"]


def test_runs_are_found_by_unique_prefix(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        start(store, "20261123-010000-aaaaaa")
        start(store, "20261123-010000-bbbbbb")
        start(store, "20261124-020000-cccccc")
        assert store.get_run("20261124").id == "20261124-020000-cccccc"
        assert store.get_run("20261123-010000-b").id == "20261123-010000-bbbbbb"
        with pytest.raises(NotFound, match="ambiguous"):
            store.get_run("20261123")
        with pytest.raises(NotFound, match="no run"):
            store.get_run("1999")
        with pytest.raises(NotFound):
            store.get_run("2026112_")  # LIKE wildcards are taken literally
        assert [r.id[-6:] for r in store.list_runs()] == ["cccccc", "bbbbbb", "aaaaaa"]
        assert len(store.list_runs(limit=1)) == 1


def test_run_ids_sort_by_time_and_do_not_collide() -> None:
    ids = {new_run_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == len("20261123-031500-ab12cd") for i in ids)


def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    RunStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    before = db.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        RunStore(db)
    assert db.read_bytes() == before


def test_twenty_threads_write_without_losing_a_row(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        run_id = start(store, hosts=20)

        def host(number: int) -> None:
            for index in range(25):
                row = store.step_started(run_id, f"web-{number}", index, f"s{index}", command="x")
                store.step_finished(row, StepStatus.OK, rc=0)

        threads = [threading.Thread(target=host, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        steps = store.get_steps(run_id)
        assert len(steps) == 500 and all(s.status == "ok" for s in steps)
        assert [s.host for s in steps[:25]] == ["web-0"] * 25, "grouped by host in host order"


CHILD = """
import sys, time
from maintenancebot.store import RunStore
from maintenancebot.states import HostStatus
store = RunStore(sys.argv[1])
store.create_run("20261123-050000-dead00", runbook="weekly", runbook_path=None, runbook_hash=None,
                 dry_run=False, started_by="cron", selection="all",
                 hosts=[("web-0", None), ("web-1", None)])
store.set_host_status("20261123-050000-dead00", "web-0", HostStatus.RUNNING)
store.step_started("20261123-050000-dead00", "web-0", 3, "apt upgrade", command="apt-get -y upgrade")
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_process_leaves_an_interrupted_run_naming_its_step(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with RunStore(db) as store:
            assert store.reap_interrupted() == [], "a live run is left alone"
            assert store.get_run("20261123-050000-dead00").status == "running"
        child.kill()
        child.wait(10)
        with RunStore(db) as store:
            assert store.reap_interrupted() == ["20261123-050000-dead00"]
            run = store.get_run("20261123-050000-dead00")
            assert run.status == RunStatus.INTERRUPTED and f"pid {child.pid}" in run.reason
            step = store.interrupted_step(run.id)
            assert step is not None and (step.name, step.idx, step.error) == ("apt upgrade", 3, DIED)
            assert {h.host: h.status for h in store.get_hosts(run.id)} == {
                "web-0": HostStatus.INTERRUPTED, "web-1": HostStatus.INTERRUPTED}
            assert store.reap_interrupted() == [], "reaping is idempotent"
            assert store.audit_log(run.id)[-1].action == "run.interrupted"
    finally:
        child.kill()


def test_a_reused_pid_does_not_keep_a_dead_run_alive(tmp_path: Path) -> None:
    """Our own pid is alive, but with a different start time it is not the run's process."""
    db = tmp_path / "mb.db"
    with RunStore(db) as store:
        run_id = start(store)
    raw = sqlite3.connect(db)
    raw.execute("UPDATE runs SET proc_start = '1' WHERE id = ?", (run_id,))
    raw.commit()
    raw.close()
    with RunStore(db) as store:
        assert store.reap_interrupted() == [run_id]


def test_token_ledger_sums_per_run_and_per_day(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        store.record("r1", 100, 20)
        store.record("r1", 10, 2)
        store.record("r2", 5, 5)
        assert store.used_for_run("r1") == 132 and store.used_for_run("r2") == 10
        assert store.used_today() == 142


def test_readers_wait_for_a_busy_writer_instead_of_failing(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    with RunStore(db) as store:
        run_id = start(store)
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.5, lambda: blocker.execute("COMMIT"))
    released.start()
    begun = time.monotonic()
    with RunStore(db) as store:
        store.finish_run(run_id, RunStatus.SUCCEEDED)
        assert store.get_run(run_id).status == "succeeded"
    assert time.monotonic() - begun >= 0.4
    released.join()
    blocker.close()


class CountingStore(RunStore):
    """The real store, counting how often a run reads the kill switch."""

    reads = 0

    def stop_state(self) -> StopState | None:
        self.reads += 1
        return super().stop_state()


def test_a_run_reads_the_kill_switch_rarely_yet_halts_at_once_after_set_stop(
        tmp_path: Path) -> None:
    with CountingStore(tmp_path / "mb.db") as store, RunStore(tmp_path / "mb.db") as operator:
        control = RunControl("run-1", store, timeout=3600, max_failures=None)
        assert all(control.halt_reason() is None for _ in range(200))
        assert store.reads == 1  # one query for 200 checks made within STOP_READ_SECONDS
        operator.set_stop("incident 4711", "oncall")  # another process, as `maintenancebot stop`
        # set_stop returned: the very next check sees the switch, however fresh the last read.
        assert "incident 4711" in (control.halt_reason() or "")
        assert store.reads == 2
        operator.clear_stop("oncall")
        assert "incident 4711" in (control.halt_reason() or ""), "a run once halted stays so"
