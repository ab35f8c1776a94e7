"""Resuming a run that waits on approvals with no process (DESIGN §5, Durability).

A run detaches when its process leaves while hosts are parked (`run --no-wait`, a daemon stop,
a crash: the store's reaper marks it `waiting`). The daemon takes it back here: the runbook the
run started with (the same content hash, or the recorded git commit), the same host selection
and `--var` values, and each host's record — finished hosts stay finished, parked hosts go on
from their parked step with what their completed steps registered, never re-running them.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maintenancebot.actions import ActionReport, get_action
from maintenancebot.errors import MaintenanceBotError
from maintenancebot.hostrun import Completed, HostRun
from maintenancebot.inventory import resolve_inventory
from maintenancebot.loader import load_inventory, load_runbook
from maintenancebot.models import Host, Settings
from maintenancebot.plan import Plan, RunbookSource, build_plan, host_contexts
from maintenancebot.states import TERMINAL_HOST, HostStatus, RunStatus, StepStatus
from maintenancebot.store import HostRecord, RunRecord, RunStore, StepRecord
from maintenancebot.store_approvals import CANCELLED
from maintenancebot.templating import Registered

if TYPE_CHECKING:
    from maintenancebot.engine import RunOutcome

log = logging.getLogger(__name__)

_RESUMING: set[str] = set()  # runs this process is resuming now
_RESUMING_LOCK = threading.Lock()


class CannotResume(MaintenanceBotError):
    """The run cannot go on faithfully (its runbook changed and no commit has the old one)."""


def resume_waiting_runs(settings: Settings, store: RunStore) -> list[threading.Thread]:
    """Take every waiting run of this controller and resume each in a thread of its own;
    returns at once (the daemon calls it at start and then periodically)."""
    threads = []
    for run in store.list_runs(limit=1000, status=RunStatus.WAITING):
        with _RESUMING_LOCK:
            if run.id in _RESUMING:
                continue
            _RESUMING.add(run.id)
        thread = threading.Thread(target=_resume_logged, args=(settings, run.id),
                                  name=f"resume-{run.id}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _resume_logged(settings: Settings, run_id: str) -> None:
    try:
        outcome = resume_run(settings, run_id)
        if outcome is not None:
            log.info("resumed run %s ended %s", run_id, outcome.status)
    except Exception:
        log.exception("resuming run %s failed", run_id)
    finally:
        with _RESUMING_LOCK:
            _RESUMING.discard(run_id)


def resume_run(settings: Settings, run_id: str) -> RunOutcome | None:
    """Resume one waiting run in this thread; None when another process holds it or its hosts
    are busy (it stays waiting and is tried again later)."""
    from maintenancebot import app  # app wires engines and reporting; it imports us lazily too

    with app.open_store(settings) as store:
        run = store.get_run(run_id)
        if run.status is not RunStatus.WAITING:
            return None
        try:
            plan = plan_for(settings, run, [h.host for h in store.get_hosts(run.id)])
        except (CannotResume, MaintenanceBotError, OSError) as exc:
            _give_up(store, run, str(exc))
            return None
        return app.resume(settings, store, plan, run)


def plan_for(settings: Settings, run: RunRecord, recorded: list[str]) -> Plan:
    """The plan the run started with: its runbook content, selection and `--var` values."""
    if not run.runbook_path:
        raise CannotResume("the run has no recorded runbook file")
    path = Path(run.runbook_path)
    runbook, source = _runbook_as_started(path, run)
    if not settings.inventory:
        raise CannotResume("no inventory configured")
    inventory = resolve_inventory(load_inventory(Path(settings.inventory).expanduser()))
    overrides: dict[str, Any] = dict(run.meta.get("overrides") or {})
    narrow = list(run.meta.get("narrow") or []) or None
    plan = build_plan(runbook, inventory, source, narrow, overrides)
    if sorted(h.name for h in plan.hosts) != sorted(recorded):
        raise CannotResume("the inventory no longer selects the run's hosts "
                           f"({', '.join(recorded)})")
    return plan


def _runbook_as_started(path: Path, run: RunRecord) -> tuple[Any, RunbookSource]:
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == run.runbook_hash:
        return load_runbook(path), RunbookSource(path, run.runbook_hash or "", run.git_commit,
                                                 run.git_dirty)
    if run.git_commit and run.git_dirty is False:
        text = _git_show(path, run.git_commit)
        if text is not None and hashlib.sha256(text).hexdigest() == run.runbook_hash:
            with tempfile.TemporaryDirectory() as scratch:
                copy = Path(scratch) / path.name
                copy.write_bytes(text)
                return load_runbook(copy), RunbookSource(path, run.runbook_hash or "",
                                                         run.git_commit, False)
    raise CannotResume(f"{path} changed since the run started and no git commit holds the "
                       "version it started with; start a new run")


def _git_show(path: Path, commit: str) -> bytes | None:
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True,
                              timeout=10, check=False)

    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return None
    relative = path.resolve().relative_to(Path(top.stdout.decode().strip()).resolve())
    shown = git("show", f"{commit}:{relative.as_posix()}")
    return shown.stdout if shown.returncode == 0 else None


def _give_up(store: RunStore, run: RunRecord, why: str) -> None:
    """Close the run as interrupted, with its open requests cancelled, saying why."""
    reason = f"cannot resume: {why}"
    if not store.attach_run(run.id, "maintenancebot"):
        return
    for request in store.list_approvals(run_id=run.id):
        store.close_entries(request.id, None, CANCELLED, reason)
    for step in store.get_steps(run.id):
        if step.status is StepStatus.WAITING:
            store.settle_waiting_step(step.id, StepStatus.INTERRUPTED, reason)
    for host in store.get_hosts(run.id):
        if host.status in (HostStatus.WAITING, HostStatus.PENDING):
            store.set_host_status(run.id, host.host, HostStatus.INTERRUPTED, reason)
    store.finish_run(run.id, RunStatus.INTERRUPTED, reason)
    log.error("run %s: %s", run.id, reason)


# ------------------------------------------------------------------------------ host state


@dataclass
class HostResume:
    """How a host of a resumed run goes on: finished (its status), or from step `start` with
    what its completed steps registered and did (for conditions and rollback)."""

    finished: HostStatus | None = None
    start: int = 0
    parked_row: int | None = None
    registered: dict[str, Registered] = field(default_factory=dict)
    done: list[Completed] = field(default_factory=list)

    def apply(self, host_run: HostRun) -> None:
        host_run.start = self.start
        host_run.parked_row = self.parked_row
        host_run.registered = dict(self.registered)
        host_run.done = list(self.done)


def host_states(plan: Plan, run: RunRecord, store: RunStore) -> dict[str, HostResume]:
    run_vars = {"id": run.id, "dry_run": False,
                "started_at": run.started_at.isoformat(timespec="seconds")}
    states = {}
    for record in store.get_hosts(run.id):
        states[record.host] = host_state(plan, plan.host(record.host), record,
                                         store.get_steps(run.id, record.host), run_vars)
    return states


def host_state(plan: Plan, host: Host, record: HostRecord, steps: list[StepRecord],
               run_vars: dict[str, Any]) -> HostResume:
    if record.status in TERMINAL_HOST:
        return HostResume(finished=record.status)
    if record.status is HostStatus.PENDING:
        return HostResume()
    parked = next((s for s in steps if s.kind == "step" and s.status is StepStatus.WAITING),
                  None)
    if parked is None:  # nothing to go on from: it was in flight when its process died
        return HostResume(finished=HostStatus.INTERRUPTED)
    latest: dict[int, StepRecord] = {}
    for row in steps:
        if row.kind == "step" and row.idx < parked.idx:
            latest[row.idx] = row
    resume = HostResume(start=parked.idx, parked_row=parked.id)
    for index in sorted(latest):
        row = latest[index]
        step = plan.runbook.steps[index]
        contexts = host_contexts(plan, host, run_vars, dict(resume.registered))
        if row.status is StepStatus.OK:
            resume.done.append(_done(plan, step, index, row, *contexts))
        if step.register_as:
            resume.registered[step.register_as] = Registered(
                stdout=(row.stdout_tail or "").rstrip("\n"), stderr=row.stderr_tail or "",
                rc=row.rc, changed=bool(row.changed),
                duration=float(row.details.get("duration", 0.0) or 0.0),
                skipped=row.status in (StepStatus.SKIPPED, StepStatus.DENIED),
                failed=row.status in (StepStatus.FAILED, StepStatus.TIMED_OUT),
                data=row.details if step.action else None)
    return resume


def _done(plan: Plan, step: Any, index: int, row: StepRecord, context: dict[str, Any],
          shown_context: dict[str, Any]) -> Completed:
    args, report = None, None
    if step.action:
        action = get_action(step.action)
        assert action is not None
        args = action.Args.model_validate(plan.templates.render_value(step.args, context))
        report = ActionReport(ok=True, changed=bool(row.changed), summary=row.stdout_tail or "",
                              data=row.details, stdout=row.stdout_tail or "",
                              stderr=row.stderr_tail or "", rc=row.rc)
    return Completed(step, index, row.id, context, shown_context, args, report)
