"""Group commit: writes of many threads share COMMITs, yet each is on disk when it returns."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from maintenancebot.states import StepStatus
from maintenancebot.store import RunStore
from maintenancebot.store_commit import GroupCommit


def test_each_write_is_visible_to_another_connection_as_soon_as_it_returns(tmp_path: Path) -> None:
    db = tmp_path / "mb.db"
    hosts = [f"web-{i:02d}" for i in range(30)]
    unseen: list[str] = []
    with RunStore(db) as store:
        run_id = "20261123-010000-aaaaaa"
        store.create_run(run_id, runbook="weekly", runbook_path=None, runbook_hash=None,
                         dry_run=False, started_by="alice", selection="all",
                         hosts=[(h, None) for h in hosts])

        def host(name: str) -> None:
            reader = sqlite3.connect(db)  # another process would see what this one sees
            try:
                for index in range(5):
                    row = store.step_started(run_id, name, index, f"step {index}", command="true")
                    seen = reader.execute("SELECT status FROM steps WHERE id = ?", (row,)).fetchone()
                    if seen != ("running",):
                        unseen.append(f"{name} step {index}: {seen}")
                    store.step_finished(row, StepStatus.OK, rc=0)
            finally:
                reader.close()

        threads = [threading.Thread(target=host, args=(name,)) for name in hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert unseen == []
        steps = store.get_steps(run_id)
    assert len(steps) == 150 and {s.status for s in steps} == {"ok"}


@pytest.mark.parametrize("one_statement", [False, True])
def test_a_failing_write_undoes_only_itself(tmp_path: Path, one_statement: bool) -> None:
    connection = sqlite3.connect(tmp_path / "t.db", isolation_level=None,
                                 check_same_thread=False)
    connection.execute("CREATE TABLE t (x INTEGER UNIQUE)")
    commits = GroupCommit(connection, threading.RLock())
    with commits.write() as db:  # one transaction: the inner write is part of it
        db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError):
            if one_statement:
                commits.execute("INSERT INTO t VALUES (1)")
            else:
                with commits.write() as inner:
                    inner.execute("INSERT INTO t VALUES (2)")
                    inner.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (3)")
    commits.close()
    other = sqlite3.connect(tmp_path / "t.db")
    assert sorted(x for (x,) in other.execute("SELECT x FROM t")) == [1, 3]


def test_the_flusher_thread_ends_when_the_store_is_closed(tmp_path: Path) -> None:
    with RunStore(tmp_path / "mb.db") as store:
        store.set_stop("maintenance window", by="alice")
        assert any(t.name == "store-commit" for t in threading.enumerate())
    deadline = time.monotonic() + 5
    while any(t.name == "store-commit" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the flusher outlived its store"
        time.sleep(0.01)


def _parent_child(path: Path) -> tuple[sqlite3.Connection, GroupCommit]:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    # Deferred: SQLite checks it at COMMIT, so a commit can fail for real.
    connection.execute("CREATE TABLE child (parent INTEGER REFERENCES parent(id) "
                       "DEFERRABLE INITIALLY DEFERRED)")
    return connection, GroupCommit(connection, threading.RLock())


def test_a_write_that_does_not_wait_is_on_disk_once_a_later_waiting_write_returns(
        tmp_path: Path) -> None:
    connection, commits = _parent_child(tmp_path / "t.db")
    reader = sqlite3.connect(tmp_path / "t.db")
    for number in range(50):
        with commits.write(wait=False) as db:
            db.execute("INSERT INTO parent VALUES (?)", (2 * number,))
        with commits.write() as db:
            db.execute("INSERT INTO parent VALUES (?)", (2 * number + 1,))
        seen = {x for (x,) in reader.execute("SELECT id FROM parent")}
        assert {2 * number, 2 * number + 1} <= seen, f"round {number}: only {sorted(seen)[-3:]}"
    commits.close()
    connection.close()


@pytest.mark.parametrize("one_statement", [False, True])
def test_a_lost_write_that_nobody_waited_for_fails_the_next_write(
        tmp_path: Path, one_statement: bool) -> None:
    connection, commits = _parent_child(tmp_path / "t.db")
    orphan = "INSERT INTO child VALUES (42)"  # no parent 42: the COMMIT will fail
    if one_statement:
        commits.execute(orphan, wait=False)
    else:
        with commits.write(wait=False) as db:
            db.execute(orphan)
    deadline = time.monotonic() + 5
    while commits._batch is not None:  # the flusher takes the batch within milliseconds
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with (pytest.raises(sqlite3.OperationalError, match="lost.*FOREIGN KEY"),
          commits.write() as db):
        db.execute("INSERT INTO parent VALUES (1)")
    with commits.write() as db:  # said once; the store goes on
        db.execute("INSERT INTO parent VALUES (2)")
    commits.close()
    rows = sqlite3.connect(tmp_path / "t.db").execute("SELECT * FROM child").fetchall()
    assert rows == []
    connection.close()


def test_a_threads_writes_keep_their_order_and_its_reads_see_them(tmp_path: Path) -> None:
    """One-statement writes nobody waits for and block writes land in the order a thread made
    them, and a read sees them before they are committed."""
    run_id = "20261123-010000-bbbbbb"
    with RunStore(tmp_path / "mb.db") as store:
        store.create_run(run_id, runbook="weekly", runbook_path=None, runbook_hash=None,
                         dry_run=False, started_by="alice", selection="all",
                         hosts=[("web-01", None)])
        for index in range(20):
            row = store.step_started(run_id, "web-01", index, f"step {index}", command="true")
            store.step_finished(row, StepStatus.OK, rc=0)  # nobody waits for its commit
            assert store.get_step(row).status == StepStatus.OK  # seen before the commit
            store.set_step_status(row, StepStatus.ROLLED_BACK)  # a block write, after it
    other = sqlite3.connect(tmp_path / "mb.db")
    statuses = [s for (s,) in other.execute("SELECT status FROM steps ORDER BY id")]
    assert statuses == ["rolled_back"] * 20
