"""Walks a Plan across the fleet: batches, concurrency, the breaker, and the run's final status.

The engine decides nothing about *what* runs (that is the plan) and touches no socket or SQL
itself: hosts run in threads through `HostRun`, state goes to the store. It imports no
third-party library, so it stays testable with any transport factory.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from maintenancebot.errors import MaintenanceBotError
from maintenancebot.hostrun import HostRun
from maintenancebot.models import Host
from maintenancebot.plan import Plan
from maintenancebot.runcontrol import Observer, RunControl
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.store import RunStore
from maintenancebot.transports.base import Command, TransportFactory

log = logging.getLogger(__name__)

_CONTROLLER = Host(name="controller", address="localhost", connection="local")


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: RunStatus
    reason: str | None
    hosts: Mapping[str, HostStatus]
    dry_run: bool


class Engine:
    def __init__(
        self,
        store: RunStore,
        open_transport: TransportFactory,
        *,
        observer: Observer | None = None,
        action_state: Mapping[str, Any] | None = None,
    ) -> None:
        self._store = store
        self._open_transport = open_transport
        self._observer = observer
        self._action_state = action_state or {}

    def execute(self, plan: Plan, run_id: str, *, dry_run: bool, started_by: str) -> RunOutcome:
        """Run (or dry-run) `plan`; every state change is in the store before the next action."""
        self._store.create_run(
            run_id, runbook=plan.runbook.name,
            runbook_path=str(plan.source.path) if plan.source.path else None,
            runbook_hash=plan.source.sha256, dry_run=dry_run, started_by=started_by,
            selection=plan.selection, hosts=[(h.name, h.address) for h in plan.hosts],
            git_commit=plan.source.git_commit, git_dirty=plan.source.git_dirty,
            # Which vars were overridden is part of the record; their values may be secrets.
            meta={"controller": socket.gethostname(), "overridden_vars": sorted(plan.overrides)},
        )
        control = RunControl(
            run_id, self._store, timeout=plan.runbook.timeout, max_failures=plan.max_failures,
            observer=self._observer, action_state=self._action_state,
            # A dry-run shows every host's plan: the window limits real runs only.
            window=None if dry_run else plan.runbook.window,
        )
        run_vars = {"id": run_id, "dry_run": dry_run,
                    "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
        statuses: dict[str, HostStatus] = {}
        for number, batch in enumerate(plan.batches, 1):
            statuses.update(self._run_batch(plan, batch, run_id, dry_run, control, run_vars))
            if number < len(plan.batches) and not dry_run:
                self._check_batch(plan, number, batch, statuses, control)
        # A controller shutting down (daemon SIGTERM) interrupts; nobody aborted the run.
        status = (RunStatus.INTERRUPTED if control.interrupted
                  else _final_status(statuses, control.abort_reason, dry_run))
        self._store.finish_run(run_id, status, control.abort_reason)
        return RunOutcome(run_id, status, control.abort_reason, statuses, dry_run)

    def _run_batch(
        self, plan: Plan, batch: tuple[str, ...], run_id: str, dry_run: bool,
        control: RunControl, run_vars: dict[str, Any],
    ) -> dict[str, HostStatus]:
        def one(name: str) -> HostStatus:
            refusal = control.start_refusal()
            if refusal:
                self._store.set_host_status(run_id, name, HostStatus.NOT_STARTED, refusal)
                control.emit(name, None, HostStatus.NOT_STARTED)
                return HostStatus.NOT_STARTED
            host_run = HostRun(plan, plan.host(name), run_id, dry_run, self._store,
                               self._open_transport, control, run_vars)
            try:
                return host_run.execute()
            except Exception as exc:  # a bug must fail its host loudly, not the whole fleet
                log.exception("internal error on host %s", name)
                self._store.set_host_status(run_id, name, HostStatus.FAILED,
                                            f"internal error: {type(exc).__name__}: {exc}")
                control.host_finished(name, HostStatus.FAILED)
                return HostStatus.FAILED

        workers = max(1, min(plan.runbook.concurrency, len(batch)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="host") as pool:
            return dict(zip(batch, pool.map(one, batch)))

    def _check_batch(
        self, plan: Plan, number: int, batch: tuple[str, ...],
        statuses: Mapping[str, HostStatus], control: RunControl,
    ) -> None:
        """A canary that failed, or a failing `between_batches` check, stops the rollout."""
        failed = [name for name in batch
                  if statuses[name] in (HostStatus.FAILED, HostStatus.UNREACHABLE)
                  and name not in control.contained_failures]
        if failed:
            control.abort(f"batch {number} had failures ({', '.join(failed)}); "
                          "later batches not started")
            return
        check = plan.runbook.between_batches
        if check is None:
            return
        transport = self._open_transport(_CONTROLLER)
        try:
            result = transport.run(Command(script=check, timeout=300))
        except MaintenanceBotError as exc:
            control.abort(f"between_batches check after batch {number} failed: {exc}")
            return
        finally:
            transport.close()
        self._store.audit("batch.check", run_id=control.run_id,
                          details={"batch": number, "command": check, "rc": result.rc})
        if not result.ok:
            control.abort(f"between_batches check after batch {number} failed "
                          f"(exit {result.rc}): {result.stderr.strip()[-200:]}")


def _final_status(
    statuses: Mapping[str, HostStatus], abort_reason: str | None, dry_run: bool
) -> RunStatus:
    if abort_reason:
        return RunStatus.ABORTED
    if any(s in (HostStatus.FAILED, HostStatus.UNREACHABLE) for s in statuses.values()):
        return RunStatus.FAILED
    return RunStatus.SUCCEEDED
