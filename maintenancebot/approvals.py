"""Approval gates: hosts park at a gated step, share one request, and wait for a human.

Owned here: who may answer (`answer`: approvers, four eyes, quorum through the store), what an
answer binds to (`fingerprint` of the rendered step and its preview), and the per-run desk where
a host's thread parks (`ApprovalDesk`: gathering hosts into one request, waiting for the
decision, the deadline, the reminder, detaching for `--no-wait` or a daemon stop).
Not here: SQL (`store_approvals`), the step itself (`hostrun`), Slack's wire format
(`notify.slack_approvals`), resuming a detached run (`resume`).

The store is the one source of truth for a decision: an answer from another process (the CLI in
another terminal, the daemon's Slack endpoint) is seen by polling it, so nothing depends on
which process answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from maintenancebot.errors import MaintenanceBotError
from maintenancebot.models import Settings, Step
from maintenancebot.runcontrol import RunControl
from maintenancebot.store import RunStore
from maintenancebot.store_approvals import (
    APPROVED,
    CANCELLED,
    DENIED,
    EXPIRED,
    SUPERSEDED,
    ApprovalRecord,
    VoteOutcome,
)

log = logging.getLogger(__name__)

GATHER_SECONDS = 5.0  # hosts of one batch reaching a gate within this share one request
POLL_SECONDS = 0.5    # how often a parked host looks for its answer
# Parts of an action's preview that change by themselves (clocks, timings): not what it does.
_VOLATILE_KEYS = frozenset({"duration", "now", "age_seconds", "checked_at", "elapsed"})


class AnswerRefused(MaintenanceBotError):
    """An answer that does not count: not an approver, self-approval, a closed request."""


# ------------------------------------------------------------------------------ answers


def answer(
    settings: Settings, store: RunStore, request_id: int, *, approve: bool, by: str,
    channel: str, hosts: Sequence[str] | None = None, reason: str | None = None,
    origin: dict[str, Any] | None = None,
) -> VoteOutcome:
    """Record one person's answer to a request, or raise AnswerRefused (recorded in the audit
    table either way). `channel` is "cli" or "slack"; `by` a CLI name or a Slack user id;
    `origin` what else says who it was (the CLI's OS user behind a `--by`), for the audit."""
    request = store.get_approval(request_id)
    vote = "approve" if approve else "deny"
    refusal = _refusal(settings, store, request, by=by, channel=channel, approve=approve)
    if refusal:
        store.audit("approval.refused", run_id=request.run_id, actor=by, details={
            "approval": request_id, "vote": vote, "channel": channel, "why": refusal,
            **(origin or {})})
        raise AnswerRefused(refusal)
    return store.cast_vote(request_id, vote=vote, voter=by, channel=channel, hosts=hosts,
                           reason=reason, origin=origin)


def _refusal(settings: Settings, store: RunStore, request: ApprovalRecord, *, by: str,
             channel: str, approve: bool) -> str | None:
    allowed = settings.approvers.slack if channel == "slack" else settings.approvers.cli
    if by not in allowed:
        return (f"{by!r} is not an approver on {channel} (config `approvers.{channel}`: "
                f"{', '.join(allowed) or 'nobody'})")
    if request.status != "open":
        first = "; ".join(f"{h.host}: {h.decision} by {h.decided_by}" for h in request.hosts)
        return f"request {request.id} is already closed; its first answers stand ({first})"
    if approve and not settings.self_approval:
        started_by = store.get_run(request.run_id).started_by
        if started_by and started_by == by:
            return (f"{by} started run {request.run_id} and cannot approve its requests "
                    "(four eyes; config `self_approval: false`)")
    return None


# ------------------------------------------------------------------------------ what is approved


def fingerprint(step: Step, command: str, preview: dict[str, Any] | None) -> str:
    """What an approval binds to: the step as its approvers see it, that is its command (for an
    action, its rendered arguments) and what its preview says it would touch, both as the store
    records them. Only what they are shown: a digest of a secret (say, in a backup check's
    `command`), kept in the store and the audit log, would let whoever reads them test guesses
    at it offline, and the approvers never saw its value anyway."""
    body = {"step": step.name, "command": command, "preview": _stable(preview)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(item) for item in value]
    return value


def condition_values(names: Iterable[str], context: dict[str, Any]) -> dict[str, Any]:
    """Why a `when` held: the values it read, shortened for a message."""
    shown: dict[str, Any] = {}
    for name in sorted(names):
        value = context.get(name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {k: v for k, v in dataclasses.asdict(value).items()
                     if k in ("stdout", "rc", "changed", "skipped", "failed")}
        text = json.dumps(value, default=str, sort_keys=True)
        shown[name] = value if len(text) <= 300 else text[:297] + "..."
    return shown


# ------------------------------------------------------------------------------ notices


class ApprovalNotifier(Protocol):
    """Told when a request opens, is due for a reminder, and closes. Failures are logged by
    the desk and never change a decision."""

    def opened(self, request: ApprovalRecord) -> None: ...
    def reminder(self, request: ApprovalRecord) -> None: ...
    def closed(self, request: ApprovalRecord) -> None: ...


class LogNotifier:
    """Always on: the journal (daemon) or the terminal (CLI, through logging) says it too."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self._echo = echo or log.warning

    def opened(self, request: ApprovalRecord) -> None:
        self._echo(describe_opened(request))

    def reminder(self, request: ApprovalRecord) -> None:
        self._echo(f"reminder: approval {request.id} ({request.step_name}) still waits for "
                   f"{', '.join(request.waiting)}; deadline {_clock(request.deadline)} - then "
                   "it counts as denied")

    def closed(self, request: ApprovalRecord) -> None:
        self._echo(describe_closed(request))


class Fanout:
    def __init__(self, notifiers: Sequence[ApprovalNotifier]) -> None:
        self._notifiers = list(notifiers)

    def _each(self, method: str, request: ApprovalRecord) -> None:
        for notifier in self._notifiers:
            try:
                getattr(notifier, method)(request)
            except Exception:  # a notice must never decide or break a gate
                log.exception("approval notice %s for request %d failed", method, request.id)

    def opened(self, request: ApprovalRecord) -> None:
        self._each("opened", request)

    def reminder(self, request: ApprovalRecord) -> None:
        self._each("reminder", request)

    def closed(self, request: ApprovalRecord) -> None:
        self._each("closed", request)


def describe_opened(request: ApprovalRecord) -> str:
    hosts = ", ".join(h.host for h in request.hosts)
    quorum = f" ({request.quorum} approvers needed)" if request.quorum > 1 else ""
    return (f"approval {request.id}: step {request.step_name!r} of {request.runbook} (run "
            f"{request.run_id}) waits on {hosts}{quorum}; deadline {_clock(request.deadline)}, "
            f"then denied. Answer: maintenancebot approve {request.id} [--host H] | "
            f"maintenancebot deny {request.id} --reason ...")


def describe_closed(request: ApprovalRecord) -> str:
    parts = [f"{h.host} {h.decision}" + (f" by {h.decided_by}" if h.decision in
                                          (APPROVED, DENIED) else "")
             for h in request.hosts]
    return f"approval {request.id} ({request.step_name}) answered: {'; '.join(parts)}"


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------ the desk


@dataclass(frozen=True)
class Parking:
    """A host at a gate, with what it would run."""

    host: str
    index: int
    step: Step
    digest: str
    command: str
    why: dict[str, Any]
    preview: dict[str, Any] | None
    step_row: int


@dataclass(frozen=True)
class Decision:
    outcome: str  # approved | denied | expired | cancelled | detached
    request: int | None
    by: str | None = None
    reason: str | None = None


@dataclass
class _Group:
    index: int
    opens_at: float
    members: dict[str, Parking] = field(default_factory=dict)
    request: int | None = None


class ApprovalDesk:
    """One per run in this process: where the run's host threads park."""

    def __init__(
        self, store: RunStore, control: RunControl, *, runbook: str, started_by: str | None,
        notifiers: Sequence[ApprovalNotifier] = (), wait: bool = True,
        gather: float = GATHER_SECONDS, poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._control = control
        self._runbook = runbook
        self._started_by = started_by
        # Behind a Fanout, which logs a failing notice: a notice never decides or breaks a gate.
        self._notifier = Fanout(list(notifiers) or [LogNotifier()])
        self.wait = wait
        self._gather = gather
        self._poll = poll
        self._clock = clock
        self._cond = threading.Condition()
        self._active: set[str] = set()
        self._progress: dict[str, int] = {}
        self._groups: list[_Group] = []

    # progress of the batch, so a request opens as soon as nobody else can still join it

    def begin_batch(self, hosts: Iterable[str]) -> None:
        with self._cond:
            self._active = set(hosts)
            self._cond.notify_all()

    def at_step(self, host: str, index: int) -> None:
        with self._cond:
            self._progress[host] = index
            self._cond.notify_all()

    def left(self, host: str) -> None:
        with self._cond:
            self._active.discard(host)
            self._cond.notify_all()

    # parking

    def park(self, parking: Parking) -> Decision:
        """Block until this host's step is approved, denied, expired or cancelled, or the run
        detaches (`--no-wait`, this process stopping). Never raises for a notifier's sake."""
        known = self._store.approval_entry(self._control.run_id, parking.host, parking.index)
        if known is not None:
            record, entry = known
            if entry.decision == APPROVED and entry.digest == parking.digest:
                return Decision(APPROVED, record.id, entry.decided_by, entry.reason)
            if entry.decision not in (None, APPROVED):
                return Decision(entry.decision, record.id, entry.decided_by, entry.reason)
            if entry.decision is None and entry.digest == parking.digest:
                return self._await(record.id, parking)
            if entry.decision is None:
                self._store.close_entries(record.id, [parking.host], SUPERSEDED,
                                          "the step would now do something else than shown")
        request = self._join(parking)
        return self._await(request, parking) if request is not None else Decision(
            CANCELLED, None, reason=self._halted() or "the run stopped")

    def _join(self, parking: Parking) -> int | None:
        with self._cond:
            group = next((g for g in self._groups
                          if g.index == parking.index and g.request is None), None)
            if group is None:
                group = _Group(parking.index, self._clock() + self._gather)
                self._groups.append(group)
            group.members[parking.host] = parking
            self._cond.notify_all()
            while group.request is None:
                if self._halted():
                    group.members.pop(parking.host, None)
                    return None
                if self._complete(group) or self._clock() >= group.opens_at:
                    opened = self._open(group)
                    break
                self._cond.wait(timeout=max(0.05, min(self._poll, group.opens_at - self._clock())))
            else:
                return group.request
        self._notifier.opened(opened)
        return opened.id

    def _complete(self, group: _Group) -> bool:
        """Every host of the batch is parked in this group, past this step, or gone."""
        return all(host in group.members or self._progress.get(host, -1) > group.index
                   for host in self._active)

    def _open(self, group: _Group) -> ApprovalRecord:
        first = next(iter(group.members.values()))
        gate = first.step.approval
        assert gate is not None
        now = datetime.now(UTC)
        # Bounded by the run's own timeout, so the run never outlives its deadline waiting.
        seconds = self._control.bound(gate.timeout)
        deadline = now + timedelta(seconds=seconds)
        remind_at = now + timedelta(seconds=seconds * 0.75)  # a quarter of the time left
        group.request = self._store.open_approval(
            run_id=self._control.run_id, runbook=self._runbook, step_index=group.index,
            step_name=first.step.name, quorum=gate.quorum, on_deny=gate.on_deny,
            started_by=self._started_by, rollback=first.step.rollback, deadline=deadline,
            remind_at=remind_at,
            hosts=[{"host": p.host, "step_row": p.step_row, "digest": p.digest,
                    "command": p.command, "why": p.why, "preview": p.preview}
                   for p in group.members.values()])
        self._cond.notify_all()
        return self._store.get_approval(group.request)

    def _await(self, request: int, parking: Parking) -> Decision:
        while True:
            record = self._store.get_approval(request)
            entry = record.entry(parking.host)
            if entry.decision is not None:
                if record.status == "closed" and self._store.claim_closed_notice(request):
                    self._notifier.closed(record)
                return Decision(entry.decision, request, entry.decided_by, entry.reason)
            halt = self._halted()
            if halt:
                if self._control.interrupted:
                    return Decision("detached", request, reason=halt)
                self._store.close_entries(request, [parking.host], CANCELLED, halt)
                continue
            if not self.wait:
                return Decision("detached", request, reason="--no-wait: left for the daemon")
            now = datetime.now(UTC)
            if now >= record.deadline:
                self._store.close_entries(request, None, EXPIRED,
                                          "no answer before the deadline: counts as denied")
                continue
            if record.remind_at and now >= record.remind_at and \
                    self._store.claim_reminder(request):
                self._notifier.reminder(self._store.get_approval(request))
            with self._cond:
                self._cond.wait(timeout=self._poll)

    def _halted(self) -> str | None:
        # Not the breaker's abort: that stops new hosts, while hosts already going finish.
        return self._control.halt_reason()
