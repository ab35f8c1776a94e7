"""Group commit for the run store: many threads' writes share one durable COMMIT.

With synchronous=FULL every COMMIT waits for an fsync (≈4 ms on a cloud disk), and the engine
writes about a dozen rows per host, each of which must be on disk before the host goes on. One
COMMIT per write behind one lock made 50 hosts queue for 600 fsyncs in a row. Here a write joins
the transaction that is open on the store's connection (in a SAVEPOINT, so a failing write undoes
only itself) and waits; one flusher thread commits whatever has gathered, wakes exactly those
writers, and meanwhile the next batch gathers. A write still returns only once it is committed
and synced: the durability promise (a step is on disk before it runs) is the same as one COMMIT
per write, across power loss too; only the fsyncs are shared.

A write that gates nothing may leave without waiting (`wait=False`): the outcome of a step that
already ran, say. Nothing is weaker for it: SQLite commits in order on this one connection, so
the next write that does wait (the next step's start, the run's end) is on disk only once every
earlier write is, and a crash can leave no state that a waited write could not have left. If
such a batch fails to commit, the next write raises instead of building on the lost rows.

A write may also be made now and waited for later (`submit`): a step's record is written before
its SSH channel opens and waited for once it is open, so the fsync and the round trip overlap.

Why not a queue that one writer thread drains: under a 200-host run's GIL contention that thread
waited for the GIL twice for every statement (SQLite releases it), and commits fell behind by
100 ms; each host thread running its own statement spreads those waits over all of them.

Owns: BEGIN/SAVEPOINT/COMMIT on the store's connection, the flusher thread. Not here: what is
written (that is `store`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# A flusher with nothing to commit for this long exits; the next write starts another. An idle
# daemon then holds no thread, and a store nobody closed leaks none.
_IDLE_SECONDS = 2.0


class _Batch:
    """The writers of one transaction: `done` is set once its COMMIT returned (or failed:
    `error`). An Event of its own, so waking a batch's writers never contends for the store's
    lock, which the next batch's writers and the flusher need."""

    __slots__ = ("done", "error", "unawaited")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: sqlite3.Error | None = None
        self.unawaited = False  # holds a write whose writer did not wait to hear of a failure

    def wait(self) -> None:
        """Until the COMMIT returned; its failure is raised to every writer that waits."""
        self.done.wait()
        if self.error is not None:
            raise type(self.error)(*self.error.args) from self.error


class GroupCommit:
    """Transactions on `db`, a connection in autocommit mode (isolation_level=None) that only
    ever runs under `lock`."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock
        self._work = threading.Condition(lock)  # the flusher waits here for a batch
        self._batch: _Batch | None = None  # the open transaction, if any
        self._depth = 0  # nested write() calls of the thread holding the lock
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._lost: sqlite3.Error | None = None  # a failed batch that nobody waited for


    @contextmanager
    def write(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic write: committed and synced when the `with` block is left normally, or,
        with `wait=False`, committed by the flusher in order after it (see the module's doc)."""
        with self._lock:
            batch = self._join()
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
                self._wake_flusher()
            waits = self._left(batch, wait)
        if waits:
            batch.wait()

    def execute(self, sql: str, params: Sequence[Any] = (), *, wait: bool = True) -> int:
        """A write of one statement, as `write` but without its SAVEPOINT (SQLite undoes a failed
        statement by itself): one call into SQLite under the lock instead of three, for the
        writes every step makes. Returns the id of the row it inserted, if any (else 0)."""
        return self.submit(sql, params, wait=wait).result()

    def submit(self, sql: str, params: Sequence[Any] = (), *, wait: bool = True) -> Pending:
        """`execute` in two halves: the statement runs now, `.result()` waits for its COMMIT,
        so that the caller can do in between what needs no durability (open an SSH channel)."""
        with self._lock:
            batch = self._join()
            try:
                row = self._db.execute(sql, params).lastrowid or 0
            finally:
                self._wake_flusher()
            waits = self._left(batch, wait)
        return Pending(batch if waits else None, row)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads (which see the open transaction's rows too)."""
        with self._lock:
            yield self._db

    def _join(self) -> _Batch:
        """The open transaction, begun if need be; the lock is held."""
        self._raise_lost()
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

    def close(self) -> None:
        """Commit what is open and stop the flusher. Call before closing the connection."""
        with self._lock:
            self._closed = True
            self._commit()
            self._work.notify_all()
            self._raise_lost()

    def _raise_lost(self) -> None:
        if self._lost is not None:
            lost, self._lost = self._lost, None
            raise sqlite3.OperationalError(
                f"an earlier write to the run store was lost (its commit failed: {lost}); the "
                "record is incomplete") from lost

    # ------------------------------------------------------------------------------ flusher

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush, name="store-commit",
                                             daemon=True)
            self._flusher.start()
        self._work.notify()

    def _flush(self) -> None:
        with self._lock:
            try:
                while not self._closed:
                    if self._batch is None or self._depth:
                        if not self._work.wait(_IDLE_SECONDS) and self._batch is None:
                            break
                        continue
                    self._commit()
            finally:  # even if this thread dies, the next write starts another
                self._flusher = None

    def _commit(self) -> None:
        """COMMIT the open batch (if any) and wake its writers; the lock is held."""
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
                self._lost = batch.error
                log.error("the run store could not commit writes: %s", batch.error)
            batch.done.set()


class Pending:
    """A write made in the open transaction: `result()` waits until it is committed and synced
    (unless nobody waits for it) and gives the id of the row it inserted."""

    __slots__ = ("_batch", "_row")

    def __init__(self, batch: _Batch | None, row: int) -> None:
        self._batch = batch
        self._row = row

    def result(self) -> int:
        if self._batch is not None:
            self._batch.wait()
        return self._row
