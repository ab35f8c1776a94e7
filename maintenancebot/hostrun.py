"""One host's walk through its steps: conditions, execution, recording, rollback (rendering
a step is `step_render`).

Owned here: the order of steps on one host and what happens to that host when a step fails.
Not here: anything that concerns several hosts (batches, the breaker, concurrency: `engine`),
SQL (`store`), sockets (`transports`). Every step is recorded as started before it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from maintenancebot.actions import ActionContext, ActionReport, get_action
from maintenancebot.approvals import ApprovalDesk, Decision, Parking, condition_values, fingerprint
from maintenancebot.errors import CommandTimeout, ConnectError, TemplateError, TransportError
from maintenancebot.models import Host, Step
from maintenancebot.plan import Plan, host_contexts
from maintenancebot.runcontrol import RunControl
from maintenancebot.states import HostStatus, StepStatus, transition
from maintenancebot.step_render import Rendered, reads_of, render_shell, render_step, told
from maintenancebot.store import RunStore
from maintenancebot.store_approvals import APPROVED, CANCELLED
from maintenancebot.templating import Registered
from maintenancebot.transports.base import (
    RUNBOOK_OUTPUT_LIMIT,
    Command,
    Transport,
    TransportFactory,
)

log = logging.getLogger(__name__)


@dataclass
class StepOutcome:
    status: StepStatus
    rc: int | None = None
    changed: bool = False
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    details: dict[str, Any] | None = None
    report: ActionReport | None = None
    on_deny: str | None = None  # set when an approval was denied: what the host does next


@dataclass
class Completed:
    """A completed step, kept so that a later failure can roll it back."""

    step: Step
    index: int
    row: int
    context: dict[str, Any]
    shown_context: dict[str, Any]  # what its records show (plan.host_contexts)
    args: Any = None
    report: ActionReport | None = None


@dataclass
class HostRun:
    plan: Plan
    host: Host
    run_id: str
    dry_run: bool
    store: RunStore
    open_transport: TransportFactory
    control: RunControl
    run_vars: dict[str, Any]
    registered: dict[str, Registered] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)  # registers a dry-run cannot know
    done: list[Completed] = field(default_factory=list)
    status: HostStatus = HostStatus.PENDING
    contained: bool = False  # failed only in `on_failure: continue` steps
    desk: ApprovalDesk | None = None  # where gated steps park (a real run)
    start: int = 0                    # a resumed host goes on from its parked step
    parked_row: int | None = None     # ... whose `waiting` row it settles
    slot: threading.Semaphore | None = None  # the engine's concurrency slot, given back parked

    def execute(self) -> HostStatus:
        """Walk every step of this host; returns the host's final status (already recorded),
        or WAITING when it stays parked on an approval with no process to wait for it."""
        self._set_status(HostStatus.RUNNING)
        transport = self.open_transport(self.host)
        try:
            try:
                transport.connect()
            except ConnectError as exc:
                self._record_unreached(self.start, f"not reached: host unreachable: {exc}")
                self._settle_parked(StepStatus.INTERRUPTED, f"host unreachable: {exc}")
                return self._set_status(HostStatus.UNREACHABLE, str(exc))
            return self._walk(transport)
        finally:
            transport.close()
            if self.desk is not None:
                self.desk.left(self.host.name)

    def _walk(self, transport: Transport) -> HostStatus:
        steps = self.plan.runbook.steps
        failed = False
        for index, step in enumerate(steps[self.start:], self.start):
            halt = self.control.halt_reason()
            if halt:
                self._settle_parked(StepStatus.INTERRUPTED, halt)
                self._record_unreached(index, f"not reached: {halt}")
                return self._set_status(HostStatus.INTERRUPTED, halt)
            if self.desk is not None:
                self.desk.at_step(self.host.name, index)
            outcome = self._step(transport, index, step)
            if outcome.status is StepStatus.WAITING:
                return self.status  # parked, and nobody here waits: a daemon resumes it
            if outcome.on_deny == "rollback":
                self._roll_back(transport)
                self._record_unreached(index + 1, f"not reached: approval for {step.name!r} "
                                       "denied (on_deny: rollback)")
                return self._set_status(HostStatus.FAILED, outcome.error)
            if outcome.status in (StepStatus.FAILED, StepStatus.TIMED_OUT, StepStatus.REFUSED):
                failed = True
                if step.on_failure != "continue":
                    if step.on_failure == "rollback" and not self.dry_run:
                        self._roll_back(transport)
                    self._record_unreached(index + 1, f"not reached: step {step.name!r} failed")
                    return self._set_status(HostStatus.FAILED, outcome.error)
        # `continue` keeps the host going, but the failure still counts: a report that hides it
        # would be worse than one that is red. It is contained, though: see host_finished.
        self.contained = failed
        return self._set_status(HostStatus.FAILED if failed else HostStatus.SUCCEEDED)

    # ------------------------------------------------------------------------------ one step

    def _step(self, transport: Transport, index: int, step: Step) -> StepOutcome:
        context, shown_context = host_contexts(self.plan, self.host, self.run_vars,
                                               dict(self.registered))
        blocked = self._unknown_inputs(step)
        if blocked:
            return self._decide(index, step, StepStatus.UNKNOWN, reason=(
                f"depends on {', '.join(sorted(blocked))}, which a dry-run does not run"))
        templates = self.plan.templates
        if step.when is not None:
            when = step.when
            try:
                holds = templates.evaluate(when, context)
            except TemplateError as exc:
                said = told(exc, context, shown_context, lambda c: templates.evaluate(when, c))
                why = f"when: {said}"
                self._settle_parked(StepStatus.INTERRUPTED, why)
                return self._fail_unrun(index, step, why)
            if not holds:
                self._settle_parked(StepStatus.DENIED, "its condition no longer holds")
                # Not "when: X": read after "skipped", that says the opposite of what happened.
                return self._decide(index, step, StepStatus.SKIPPED,
                                    reason=f"condition false: {step.when}")
        try:
            rendered = render_step(templates, step, context, shown_context)
        except TemplateError as exc:
            said = told(exc, context, shown_context, lambda c: render_step(templates, step, c, c))
            why = f"cannot render: {said}"
            self._settle_parked(StepStatus.INTERRUPTED, why)
            return self._fail_unrun(index, step, why)
        if step.gated and self.dry_run:
            return self._gate_preview(index, step, rendered.command)
        if step.gated:
            return self._gate(transport, index, step, rendered)
        if self.dry_run and not self._runs_in_dry_run(step):
            return self._preview(transport, index, step, rendered.command, rendered.args)
        return self._run(transport, index, step, rendered)

    def _run(
        self, transport: Transport, index: int, step: Step, rendered: Rendered,
        row: int | None = None,
    ) -> StepOutcome:
        recorded = (self.store.step_starting(self.run_id, self.host.name, index, step.name,
                                             command=rendered.command)
                    if row is None else _recorded_already(row))
        outcome = self._execute(transport, index, step, rendered.script, rendered.args, recorded)
        row = recorded()  # on disk already, unless the step failed before it could start
        self.store.step_finished(
            row, outcome.status, rc=outcome.rc, changed=outcome.changed, stdout=outcome.stdout,
            stderr=outcome.stderr, error=outcome.error, details=outcome.details,
        )
        self.control.emit(self.host.name, step.name, outcome.status)
        self._register(step, outcome)
        if outcome.status is StepStatus.OK:
            self.done.append(Completed(step, index, row, rendered.context,
                                       rendered.shown_context, rendered.args, outcome.report))
        return outcome

    def _execute(
        self, transport: Transport, index: int, step: Step, script: str | None, args: Any,
        recorded: Callable[[], int],
    ) -> StepOutcome:
        """Runs the step once `recorded` says its row is on disk: an action at once, a command
        once its channel is open (the fsync and the round trip overlap)."""
        started = time.monotonic()
        try:
            if step.action is not None:
                recorded()
                return self._apply_action(transport, index, step, args)
            assert script is not None, "a `run:` step always renders its script"
            result = transport.run(Command(
                script=script, sudo=self._sudo(step), timeout=self.control.bound(step.timeout),
                output_limit=RUNBOOK_OUTPUT_LIMIT), before_start=recorded)
        except CommandTimeout as exc:
            return StepOutcome(StepStatus.TIMED_OUT, stdout=exc.stdout, stderr=exc.stderr,
                               error=f"killed after {time.monotonic() - started:.1f}s: {exc}")
        except TransportError as exc:
            return StepOutcome(StepStatus.FAILED, error=f"connection lost: {exc}")
        status = StepStatus.OK if result.ok else StepStatus.FAILED
        error = None if result.ok else f"exit code {result.rc}"
        # A read-only probe changed nothing, whatever it printed; a command is assumed to.
        return StepOutcome(status, rc=result.rc, changed=result.ok and not step.readonly,
                           stdout=result.stdout,
                           stderr=result.stderr, error=error,
                           details={"duration": round(result.duration, 3)})

    def _apply_action(self, transport: Transport, index: int, step: Step, args: Any) -> StepOutcome:
        action = get_action(step.action or "")
        assert action is not None
        report = action.apply(transport, args, self._action_context(index, step))
        return _from_report(report)

    def _preview(
        self, transport: Transport, index: int, step: Step, command: str, args: Any
    ) -> StepOutcome:
        if step.register_as:
            self.unknown.add(step.register_as)
        if step.action is None:
            return self._decide(index, step, StepStatus.WOULD_RUN, command=command)
        action = get_action(step.action)
        assert action is not None
        if not action.previewable:
            return self._decide(index, step, StepStatus.REFUSED, command=command, reason=(
                f"action {step.action!r} cannot preview itself; refused in a dry-run"))
        row = self.store.step_started(self.run_id, self.host.name, index, step.name,
                                      command=command)
        try:
            report = action.preview(transport, args, self._action_context(index, step))
        except TransportError as exc:
            report = ActionReport(ok=False, changed=False, summary=f"preview failed: {exc}")
        status = StepStatus.WOULD_RUN if report.ok else StepStatus.FAILED
        self.store.step_finished(row, status, stdout=report.summary, details=dict(report.data),
                                 error=None if report.ok else report.summary)
        self.control.emit(self.host.name, step.name, status)
        return StepOutcome(status, details=dict(report.data), report=report,
                           error=None if report.ok else report.summary)

    def _gate_preview(self, index: int, step: Step, command: str) -> StepOutcome:
        """Dry-run: the step would wait for approval on this host; what it waits on is unknown."""
        if step.register_as:
            self.unknown.add(step.register_as)
        return self._decide(index, step, StepStatus.NEEDS_APPROVAL, command=command,
                            reason=f"would wait for approval: {step.when or 'always'}")

    def _gate(self, transport: Transport, index: int, step: Step,
              rendered: Rendered) -> StepOutcome:
        """Park until a human answers; run only what was shown to them (DESIGN §5)."""
        assert step.approval is not None
        assert self.desk is not None, "the engine gives every real run an approval desk"
        command, args = rendered.command, rendered.args
        why = condition_values(self.plan.templates.names(step.when, expression=True),
                               rendered.shown_context) if step.when else {}
        row = self.parked_row
        self.parked_row = None
        shown = self._what_it_would_do(transport, index, step, args)
        while True:
            if isinstance(shown, str):
                if row is None:
                    return self._fail_unrun(index, step, shown)
                self.store.settle_waiting_step(row, StepStatus.FAILED, shown)
                self.control.emit(self.host.name, step.name, StepStatus.FAILED)
                return StepOutcome(StepStatus.FAILED, error=shown)
            digest = fingerprint(step, self.store.as_recorded(command),
                                 self.store.as_recorded(shown))
            if row is None:
                row = self.store.record_step(self.run_id, self.host.name, index, step.name,
                                             StepStatus.WAITING, command=command,
                                             reason="waiting for approval")
                self.control.emit(self.host.name, step.name, StepStatus.WAITING)
            if self.status is not HostStatus.WAITING:
                self._set_status(HostStatus.WAITING, f"waiting for approval of {step.name!r}")
            decision = self._park(Parking(self.host.name, index, step, digest, command, why,
                                          shown, row))
            if decision.outcome == "detached":
                return StepOutcome(StepStatus.WAITING, error=decision.reason)
            self._set_status(HostStatus.RUNNING)
            if decision.outcome != APPROVED:
                return self._denied(index, step, row, decision)
            now = self._what_it_would_do(transport, index, step, args)
            if now == shown:
                break
            log.warning("%s: step %r would now do something else than was approved; "
                        "parked again", self.host.name, step.name)
            shown = now
        self.store.settle_waiting_step(row, StepStatus.RUNNING, command=command)
        self.store.audit("approval.executed", run_id=self.run_id, host=self.host.name,
                         actor=decision.by, details={"approval": decision.request,
                                                     "step": step.name, "digest": digest})
        return self._run(transport, index, step, rendered, row=row)

    def _park(self, parking: Parking) -> Decision:
        assert self.desk is not None
        if self.slot is not None:
            self.slot.release()
        try:
            return self.desk.park(parking)
        finally:
            if self.slot is not None:
                self.slot.acquire()

    def _what_it_would_do(self, transport: Transport, index: int, step: Step,
                          args: Any) -> dict[str, Any] | None | str:
        """For an action that can preview itself, its preview (what the approver sees and the
        approval binds to); None for a command; an error string when the preview failed —
        nobody is asked to approve what cannot be shown."""
        action = get_action(step.action) if step.action else None
        if action is None or not action.previewable or action.readonly:
            return None
        try:
            report = action.preview(transport, args, self._action_context(index, step))
        except TransportError as exc:
            report = ActionReport(ok=False, changed=False, summary=f"preview failed: {exc}")
        if not report.ok:
            return f"cannot show what it would do: {report.summary}"
        return {"summary": report.summary, "data": dict(report.data)}

    def _denied(self, index: int, step: Step, row: int, decision: Decision) -> StepOutcome:
        assert step.approval is not None
        who = f" by {decision.by}" if decision.by and decision.outcome == "denied" else ""
        reason = (f"approval {decision.request} {decision.outcome}{who}"
                  + (f": {decision.reason}" if decision.reason else ""))
        self.store.settle_waiting_step(row, StepStatus.DENIED, reason)
        self.control.emit(self.host.name, step.name, StepStatus.DENIED)
        denied = StepOutcome(StepStatus.DENIED, error=reason)
        self._register(step, denied)
        if decision.outcome == CANCELLED:
            return denied  # the run is stopping; the next step's check says why
        if step.approval.on_deny == "abort":
            self.control.halt(f"{reason} on {self.host.name} (on_deny: abort)")
        elif step.approval.on_deny == "rollback":
            denied.on_deny = "rollback"
        return denied

    def _settle_parked(self, status: StepStatus, reason: str | None) -> None:
        """A resumed host that will not reach its parked step settles that step's row."""
        if self.parked_row is not None:
            self.store.settle_waiting_step(self.parked_row, status, reason)
            self.parked_row = None

    # ------------------------------------------------------------------------------ rollback

    def _roll_back(self, transport: Transport) -> None:
        """Undo this host's completed steps, newest first, recording each undo as its own row."""
        for done in reversed(self.done):
            if done.step.rollback is None and not _action_changed_something(done):
                continue  # nothing declared to undo, or an action that changed nothing
            status = self._undo(transport, done)
            self.store.set_step_status(done.row, status)
            self.control.emit(self.host.name, done.step.name, status)
        self.done.clear()

    def _undo(self, transport: Transport, done: Completed) -> StepStatus:
        step = done.step
        if step.rollback is not None:
            templates, source = self.plan.templates, step.rollback
            try:
                script, command = render_shell(templates, source, done.context, done.shown_context)
            except TemplateError as exc:
                said = told(exc, done.context, done.shown_context,
                            lambda c: templates.render_shell(source, c))
                self._record_rollback(done, None, StepOutcome(StepStatus.FAILED, error=said))
                return StepStatus.ROLLBACK_FAILED
            recorded = self.store.step_starting(self.run_id, self.host.name, done.index,
                                                step.name, kind="rollback", command=command)
            outcome = self._execute(transport, done.index, step.model_copy(
                update={"run": script, "action": None}), script, None, recorded)
            self._finish(recorded(), outcome)
        else:
            action = get_action(step.action or "")
            assert action is not None and done.report is not None
            if not action.reversible:
                self._record_rollback(done, f"undo {step.action}", StepOutcome(
                    StepStatus.FAILED, error=f"{step.action} cannot be undone: {done.report.summary}"))
                return StepStatus.ROLLBACK_FAILED
            row = self.store.step_started(self.run_id, self.host.name, done.index, step.name,
                                          kind="rollback", command=f"undo {step.action}")
            try:
                outcome = _from_report(action.rollback(
                    transport, done.args, done.report, self._action_context(done.index, step)))
            except TransportError as exc:
                outcome = StepOutcome(StepStatus.FAILED, error=f"connection lost: {exc}")
            self._finish(row, outcome)
        return StepStatus.ROLLED_BACK if outcome.status is StepStatus.OK else \
            StepStatus.ROLLBACK_FAILED

    def _record_rollback(self, done: Completed, command: str | None, outcome: StepOutcome) -> None:
        row = self.store.step_started(self.run_id, self.host.name, done.index, done.step.name,
                                      kind="rollback", command=command)
        self._finish(row, outcome)

    # ------------------------------------------------------------------------------ helpers

    def _finish(self, row: int, outcome: StepOutcome) -> None:
        self.store.step_finished(
            row, outcome.status, rc=outcome.rc, changed=outcome.changed, stdout=outcome.stdout,
            stderr=outcome.stderr, error=outcome.error, details=outcome.details,
        )

    def _decide(self, index: int, step: Step, status: StepStatus, *, command: str | None = None,
                reason: str | None = None) -> StepOutcome:
        """Record a step settled without running it (skipped, unknown, would run, ...)."""
        self.store.record_step(self.run_id, self.host.name, index, step.name, status,
                               command=command, reason=reason)
        self.control.emit(self.host.name, step.name, status)
        if status is StepStatus.SKIPPED:
            self._register(step, StepOutcome(status))
        elif status is StepStatus.UNKNOWN and step.register_as:
            self.unknown.add(step.register_as)
        return StepOutcome(status, error=reason)

    def _fail_unrun(self, index: int, step: Step, error: str) -> StepOutcome:
        row = self.store.step_started(self.run_id, self.host.name, index, step.name, command=None)
        outcome = StepOutcome(StepStatus.FAILED, error=error)
        self._finish(row, outcome)
        self.control.emit(self.host.name, step.name, outcome.status)
        return outcome

    def _record_unreached(self, start: int, reason: str) -> None:
        for index, step in enumerate(self.plan.runbook.steps[start:], start):
            self.store.record_step(self.run_id, self.host.name, index, step.name,
                                   StepStatus.SKIPPED, reason=reason)

    def _register(self, step: Step, outcome: StepOutcome) -> None:
        if not step.register_as:
            return
        self.registered[step.register_as] = Registered(
            stdout=outcome.stdout.rstrip("\n"), stderr=outcome.stderr, rc=outcome.rc,
            changed=outcome.changed,
            duration=float((outcome.details or {}).get("duration", 0.0)),
            skipped=outcome.status in (StepStatus.SKIPPED, StepStatus.DENIED),
            failed=outcome.status in (StepStatus.FAILED, StepStatus.TIMED_OUT),
            data=dict(outcome.report.data) if outcome.report else None,
        )

    def _unknown_inputs(self, step: Step) -> set[str]:
        if not self.dry_run or not self.unknown:
            return set()
        return reads_of(self.plan.templates, step) & self.unknown

    def _runs_in_dry_run(self, step: Step) -> bool:
        if step.readonly:
            return True
        action = get_action(step.action) if step.action else None
        return bool(action and action.readonly)

    def _sudo(self, step: Step) -> bool:
        return self.host.sudo if step.sudo is None else step.sudo

    def _action_context(self, index: int, step: Step) -> ActionContext:
        return ActionContext(run_id=self.run_id, step_index=index, step_name=step.name,
                             sudo=self._sudo(step), timeout=self.control.bound(step.timeout),
                             dry_run=self.dry_run, state=self.control.action_state)

    def _set_status(self, status: HostStatus, error: str | None = None) -> HostStatus:
        self.status = transition(self.status, status)
        self.store.set_host_status(self.run_id, self.host.name, status, error)
        if status in (HostStatus.RUNNING, HostStatus.WAITING):
            self.control.emit(self.host.name, None, status)
        else:
            self.control.host_finished(self.host.name, status, contained=self.contained)
        return status


def _from_report(report: ActionReport) -> StepOutcome:
    return StepOutcome(
        StepStatus.OK if report.ok else StepStatus.FAILED, rc=report.rc, changed=report.changed,
        stdout=report.stdout or report.summary, stderr=report.stderr,
        error=None if report.ok else report.summary, details=dict(report.data), report=report,
    )


def _action_changed_something(done: Completed) -> bool:
    """A read-only action, or one whose report says it changed nothing, has nothing to undo."""
    if done.step.action is None:
        return False
    action = get_action(done.step.action)
    if action is None or action.readonly:
        return False
    return done.report is None or done.report.changed


def _recorded_already(row: int) -> Callable[[], int]:  # a parked step's row: on disk already
    return lambda: row
