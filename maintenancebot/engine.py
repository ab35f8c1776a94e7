"""Walks a Plan across the fleet: batches, concurrency, the breaker, and the run's final status.

The engine decides nothing about *what* runs (that is the plan) and touches no socket or SQL
itself: hosts run in threads through `HostRun`, state goes to the store. It imports no
third-party library, so it stays testable with any transport factory.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from maintenancebot.approvals import ApprovalDesk, ApprovalNotifier
from maintenancebot.errors import MaintenanceBotError
from maintenancebot.hostrun import HostRun
from maintenancebot.models import Host
from maintenancebot.plan import Plan
from maintenancebot.runcontrol import Observer, RunControl
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.store import RunRecord, RunStore
from maintenancebot.transports.base import RUNBOOK_OUTPUT_LIMIT, Command, TransportFactory

if TYPE_CHECKING:  # `resume` loads when a waiting run is resumed, not for every run
    from maintenancebot.resume import HostResume

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

    def execute(self, plan: Plan, run_id: str, *, dry_run: bool, started_by: str,
                wait: bool = True, notifiers: Sequence[ApprovalNotifier] = ()) -> RunOutcome:
        """Run (or dry-run) `plan`; every state change is in the store before the next action.

        `wait=False` (`run --no-wait`): once every host is finished or parked on an approval,
        return a WAITING outcome and leave the run to the daemon."""
        self._store.create_run(
            run_id, runbook=plan.runbook.name,
            runbook_path=str(plan.source.path) if plan.source.path else None,
            runbook_hash=plan.source.sha256, dry_run=dry_run, started_by=started_by,
            selection=plan.selection, hosts=[(h.name, h.address) for h in plan.hosts],
            git_commit=plan.source.git_commit, git_dirty=plan.source.git_dirty,
            # `--var` values go through the store's redaction: a resumed run renders with them.
            meta={"controller": socket.gethostname(), "overridden_vars": sorted(plan.overrides),
                  "overrides": plan.overrides, "narrow": list(plan.narrow),
                  "rollout": plan.rollout()},
        )
        run_vars = {"id": run_id, "dry_run": dry_run,
                    "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
        control = self._control(plan, run_id, plan.runbook.timeout, dry_run)
        desk = None if dry_run else ApprovalDesk(
            self._store, control, runbook=plan.runbook.name, started_by=started_by,
            notifiers=notifiers, wait=wait)
        return self._drive(plan, run_id, dry_run, control, run_vars, desk, {})

    def resume(self, plan: Plan, run: RunRecord, hosts: Mapping[str, HostResume],
               *, notifiers: Sequence[ApprovalNotifier] = ()) -> RunOutcome:
        """Go on with a run that waited on approvals with no process (DESIGN §5): hosts that
        finished stay finished, parked hosts go on from their parked step (completed steps are
        not re-run), hosts never started start. The run's deadline counts from its start."""
        elapsed = (datetime.now(UTC) - run.started_at).total_seconds()
        control = self._control(plan, run.id, max(1.0, plan.runbook.timeout - elapsed), False)
        desk = ApprovalDesk(self._store, control, runbook=plan.runbook.name,
                            started_by=run.started_by, notifiers=notifiers)
        run_vars = {"id": run.id, "dry_run": False,
                    "started_at": run.started_at.isoformat(timespec="seconds")}
        return self._drive(plan, run.id, False, control, run_vars, desk, hosts)

    def _control(self, plan: Plan, run_id: str, timeout: float, dry_run: bool) -> RunControl:
        return RunControl(
            run_id, self._store, timeout=timeout, max_failures=plan.max_failures,
            observer=self._observer, action_state=self._action_state,
            # A dry-run shows every host's plan: the window limits real runs only.
            window=None if dry_run else plan.runbook.window,
        )

    def _drive(
        self, plan: Plan, run_id: str, dry_run: bool, control: RunControl,
        run_vars: dict[str, Any], desk: ApprovalDesk | None, resumed: Mapping[str, HostResume],
    ) -> RunOutcome:
        statuses: dict[str, HostStatus] = {}
        for number, batch in enumerate(plan.batches, 1):
            statuses.update(self._run_batch(plan, batch, run_id, dry_run, control, run_vars,
                                            desk, resumed))
            if any(statuses[name] is HostStatus.WAITING for name in batch):
                break  # the rollout goes on once this batch's approvals are answered
            if number < len(plan.batches) and not dry_run:
                self._check_batch(plan, number, batch, statuses, control)
        waiting = sorted(name for name, status in statuses.items()
                         if status is HostStatus.WAITING)
        if waiting:
            why = control.halt_reason() if control.interrupted else "run --no-wait"
            self._store.detach_run(run_id, f"{why}: {', '.join(waiting)} parked on approvals")
            return RunOutcome(run_id, RunStatus.WAITING, None, statuses, dry_run)
        # A controller shutting down (daemon SIGTERM) interrupts; nobody aborted the run.
        status = (RunStatus.INTERRUPTED if control.interrupted
                  else _final_status(statuses, control.abort_reason, dry_run))
        self._store.finish_run(run_id, status, control.abort_reason)
        return RunOutcome(run_id, status, control.abort_reason, statuses, dry_run)

    def _run_batch(
        self, plan: Plan, batch: tuple[str, ...], run_id: str, dry_run: bool,
        control: RunControl, run_vars: dict[str, Any], desk: ApprovalDesk | None,
        resumed: Mapping[str, HostResume],
    ) -> dict[str, HostStatus]:
        # `concurrency` bounds the hosts working at once; a host parked on an approval gives
        # its slot back, so the rest of the batch can reach the gate and share one request.
        slots = threading.BoundedSemaphore(max(1, plan.runbook.concurrency))

        def one(name: str) -> HostStatus:
            resume = resumed.get(name)
            if resume is not None and resume.finished is not None:
                return resume.finished
            with slots:
                return started(name, resume)

        def started(name: str, resume: HostResume | None) -> HostStatus:
            # A parked host has started already: only a halt stops it, which its walk checks.
            parked = resume is not None and resume.parked_row is not None
            refusal = None if parked else control.start_refusal()
            if refusal:
                self._store.set_host_status(run_id, name, HostStatus.NOT_STARTED, refusal)
                control.emit(name, None, HostStatus.NOT_STARTED)
                return HostStatus.NOT_STARTED
            host_run = HostRun(plan, plan.host(name), run_id, dry_run, self._store,
                               self._open_transport, control, run_vars, desk=desk, slot=slots)
            if resume is not None:
                resume.apply(host_run)
            try:
                return host_run.execute()
            except Exception as exc:  # a bug must fail its host loudly, not the whole fleet
                log.exception("internal error on host %s", name)
                self._store.set_host_status(run_id, name, HostStatus.FAILED,
                                            f"internal error: {type(exc).__name__}: {exc}")
                control.host_finished(name, HostStatus.FAILED)
                return HostStatus.FAILED

        if desk is not None:
            desk.begin_batch(name for name in batch
                             if name not in resumed or resumed[name].finished is None)
        workers = len(batch) if desk is not None else max(1, min(plan.runbook.concurrency,
                                                                   len(batch)))
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
            result = transport.run(Command(script=check, timeout=300,
                                           output_limit=RUNBOOK_OUTPUT_LIMIT))
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
