"""Group commit for the run store: many threads' writes share one durable COMMIT.

With synchronous=FULL every COMMIT waits for an fsync (≈4 ms on a cloud disk), and the engine
writes about a dozen rows per host, each of which must be on disk before the host goes on. One
COMMIT per write behind one lock made 50 hosts queue for 600 fsyncs in a row. Here writes join
the transaction that is open on the store's connection and one flusher thread commits whatever
has gathered, wakes exactly those writers, and meanwhile the next batch gathers. A write still
returns only once it is committed and synced: the durability promise (a step is on disk before
it runs) is the same as one COMMIT per write, across power loss too; only the fsyncs are shared.

The writes every step makes are one statement each (`execute`): the writer queues it and the
flusher runs it, so a host never waits for the store's lock, which the flusher holds through
each COMMIT (and, under load, through its wait for the GIL after the fsync). Other writes
(`write`, a block of statements in a SAVEPOINT, so a failing write undoes only itself) and reads
(`read`) take the lock, and run the queued statements first: every thread sees its own writes,
in the order it made them.

A write that gates nothing may leave without waiting (`wait=False`): the outcome of a step that
already ran, say. Nothing is weaker for it: SQLite commits in order on this one connection, so
the next write that does wait (the next step's start, the run's end) is on disk only once every
earlier write is, and a crash can leave no state that a waited write could not have left. If
such a write is lost, the next one that waits raises instead of building on the lost rows.

Owns: BEGIN/SAVEPOINT/COMMIT on the store's connection, the queue, the flusher thread. Not
here: what is written (that is `store`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# A flusher with nothing to commit for this long exits; the next write starts another. An idle
# daemon then holds no thread, and a store nobody closed leaks none.
_IDLE_SECONDS = 2.0


class _Statement:
    """A write of one statement, queued by `execute` for the flusher. `done` (None when nobody
    waits) is set once it is committed, or failed: `error`."""

    __slots__ = ("done", "error", "params", "row", "sql")

    def __init__(self, sql: str, params: Sequence[Any], wait: bool) -> None:
        self.sql = sql
        self.params = params
        self.row = 0
        self.error: sqlite3.Error | None = None
        self.done = threading.Event() if wait else None

    def result(self) -> int:
        """Wait until the statement is committed and synced; the id of the row it inserted."""
        assert self.done is not None, "nobody waits for this statement"
        self.done.wait()
        if self.error is not None:
            raise type(self.error)(*self.error.args) from self.error
        return self.row


class _Batch:
    """The writes of one transaction: `done` is set once its COMMIT returned (or failed:
    `error`). Events of their own, so waking the writers never contends for the store's lock."""

    __slots__ = ("done", "error", "statements", "unawaited")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: sqlite3.Error | None = None
        self.unawaited = False  # holds a write whose writer did not wait to hear of a failure
        self.statements: list[_Statement] = []  # queued ones whose writers wait


class GroupCommit:
    """Transactions on `db`, a connection in autocommit mode (isolation_level=None) that only
    ever runs under `lock`."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock
        self._queue: deque[_Statement] = deque()  # appended without the lock (atomic)
        self._has_work = threading.Event()  # the flusher waits here
        self._flusher_lock = threading.Lock()  # who starts the flusher, and when it may stop
        self._flusher: threading.Thread | None = None
        self._batch: _Batch | None = None  # the open transaction, if any
        self._owner: int | None = None  # the thread inside write() (the lock's holder)
        self._depth = 0  # its nested write() calls
        self._closed = False
        self._lost: sqlite3.Error | None = None  # a failed write that nobody waited for

    def execute(self, sql: str, params: Sequence[Any] = (), *, wait: bool = True) -> int:
        """A write of one statement (SQLite undoes a failed statement by itself): queued for the
        flusher, committed and synced when this returns, or, with `wait=False`, soon after in
        order. Returns the id of the row it inserted, if any (else 0)."""
        if wait or self._owner == threading.get_ident():
            return self.submit(sql, params).result()
        self._queue_statement(_Statement(sql, params, wait=False))
        return 0

    def submit(self, sql: str, params: Sequence[Any] = ()) -> _Statement:
        """`execute` in two halves: queued now, waited for with `.result()` later, so that the
        caller can do what needs no durability in between (open an SSH channel, say)."""
        statement = _Statement(sql, params, wait=True)
        if self._owner == threading.get_ident():  # inside this thread's own write(): part of it
            statement.row = self._db.execute(sql, params).lastrowid or 0
            statement.done.set()  # type: ignore[union-attr]  # the outer write() commits it
            return statement
        self._queue_statement(statement)
        return statement

    def _queue_statement(self, statement: _Statement) -> None:
        if self._closed:
            raise sqlite3.ProgrammingError("the run store is closed")
        self._queue.append(statement)
        self._wake()

    @contextmanager
    def write(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic write of any statements: committed and synced when the `with` block is
        left normally, or, with `wait=False`, committed by the flusher in order after it."""
        with self._lock:
            if not self._depth:  # not inside a SAVEPOINT that could take others' rows back
                self._drain()
            self._raise_lost()
            batch = self._join()
            self._owner = threading.get_ident()
            self._depth += 1
            try:
                self._db.execute("SAVEPOINT write")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK TO write")
                    raise
                finally:
                    self._db.execute("RELEASE write")
            finally:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
            waits = self._left(batch, wait)
        self._wake()
        if waits:
            batch.done.wait()
            if batch.error is not None:
                raise type(batch.error)(*batch.error.args) from batch.error

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads that see every write made so far (queued ones included)."""
        with self._lock:
            if not self._depth:
                self._drain()
            yield self._db
        if self._batch is not None:
            self._wake()

    def close(self) -> None:
        """Commit what is queued or open and stop the flusher. Call before closing the
        connection."""
        with self._lock:
            self._drain()
            self._closed = True
            self._commit()
            self._raise_lost()
        self._has_work.set()  # the flusher sees `_closed` and ends

    # ------------------------------------------------------------------------------ under the lock

    def _join(self) -> _Batch:
        """The open transaction, begun if need be."""
        if self._batch is None:
            # IMMEDIATE: take SQLite's write lock now, so another process's writer waits
            # (busy_timeout) instead of both deadlocking on an upgrade later.
            self._db.execute("BEGIN IMMEDIATE")
            self._batch = _Batch()
        return self._batch

    def _left(self, batch: _Batch, wait: bool) -> bool:
        """Whether the writer that just left `batch` waits for its commit: not when an outer
        write() of this thread will, nor when it chose not to (then a failure is kept)."""
        if self._depth:
            return False
        batch.unawaited |= not wait
        return wait

    def _drain(self) -> None:
        """Run the queued statements, in order, in the open transaction."""
        while self._queue:
            statement = self._queue.popleft()
            if statement.done is not None and self._lost is not None:
                statement.error = self._lost_error()  # said to the next writer that listens
                statement.done.set()
                continue
            try:
                batch = self._join()
                statement.row = self._db.execute(statement.sql, statement.params).lastrowid or 0
            except sqlite3.Error as exc:
                if statement.done is None:
                    self._lose(exc)
                else:
                    statement.error = exc
                    statement.done.set()
                continue
            if statement.done is None:
                batch.unawaited = True
            else:
                batch.statements.append(statement)

    def _commit(self) -> None:
        """COMMIT the open batch (if any) and wake its writers."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            batch.error = exc
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may have rolled back on its own already
        except BaseException as exc:  # not SQLite's: no writer may believe its row is on disk
            batch.error = sqlite3.OperationalError(f"commit failed: {exc!r}")
            raise
        finally:  # whatever happened, no writer of this batch waits forever
            if batch.error is not None and batch.unawaited:
                self._lose(batch.error)
            for statement in batch.statements:
                statement.error = batch.error
                statement.done.set()  # type: ignore[union-attr]  # only waited ones are here
            batch.done.set()

    def _lose(self, error: sqlite3.Error) -> None:
        self._lost = self._lost or error
        log.error("the run store could not record a write: %s", error)

    def _lost_error(self) -> sqlite3.Error:
        lost, self._lost = self._lost, None
        return sqlite3.OperationalError(
            f"an earlier write to the run store was lost ({lost}); the record is incomplete")

    def _raise_lost(self) -> None:
        if self._lost is not None:
            lost = self._lost
            raise self._lost_error() from lost

    # ------------------------------------------------------------------------------ flusher

    def _wake(self) -> None:
        self._has_work.set()
        with self._flusher_lock:
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(target=self._flush, name="store-commit",
                                                 daemon=True)
                self._flusher.start()

    def _flush(self) -> None:
        try:
            while True:
                if not self._has_work.wait(_IDLE_SECONDS):
                    with self._flusher_lock:  # a writer that queues now starts another
                        if not self._has_work.is_set():
                            self._flusher = None
                            return
                with self._lock:
                    if self._closed:
                        return
                    self._has_work.clear()  # what comes after this is for the next round
                    self._drain()
                    self._commit()
        finally:  # even if this thread dies, the next write starts another
            with self._flusher_lock:
                if self._flusher is threading.current_thread():
                    self._flusher = None
