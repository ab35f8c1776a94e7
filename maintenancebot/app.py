"""Wiring and use cases: from settings to a store, transports and an engine; run, stop, resume.

The CLI and the daemon both call these functions, so a scheduled run and a hand-started run are
the same code path. Nothing here prints or picks an exit code (that is `cli`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from maintenancebot.approvals import ApprovalNotifier, LogNotifier
from maintenancebot.engine import Engine, RunOutcome
from maintenancebot.errors import ConfigError, HostsBusy
from maintenancebot.inventory import resolve_inventory
from maintenancebot.loader import load_inventory
from maintenancebot.models import Settings
from maintenancebot.plan import Plan
from maintenancebot.reporting import guard_logs, redactor_for, report_run
from maintenancebot.runcontrol import Observer
from maintenancebot.states import RunStatus
from maintenancebot.store import RunRecord, RunStore, new_run_id
from maintenancebot.transports import open_transport
from maintenancebot.transports.base import TransportFactory


def open_store(settings: Settings) -> RunStore:
    """The run store, with runs left behind by a dead process marked interrupted."""
    return RunStore.of_state_dir(settings.state_dir)


def execute(
    settings: Settings, plan: Plan, *, dry_run: bool, observer: Observer | None = None,
    started_by: str | None = None, store: RunStore | None = None, notify: bool = False,
    console: TextIO | None = None, wait: bool = True,
    approval_echo: Callable[[str], None] | None = None,
    transports: TransportFactory | None = None,
) -> RunOutcome:
    """Run `plan`, then report it: to `console` if given, and to Slack for a real run (or a
    dry-run with `notify`). Secrets of this run are redacted from the store and the logs.
    `wait=False`: return (status `waiting`) once every host is done or parked on an approval;
    the daemon resumes the run when the approvals are answered. `transports`: where the hosts'
    connections come from, if not fresh ones (the CLI's `Predial`)."""
    own_store = store is None
    store = store or open_store(settings)
    try:
        redactor = redactor_for(settings, plan_secrets(plan))
        store.set_redactor(redactor)
        guard_logs(redactor)
        engine = _engine(settings, store, observer, transports)
        run_id = new_run_id()
        with host_leases(store, plan, run_id, dry_run=dry_run):
            outcome = engine.execute(
                plan, run_id, dry_run=dry_run, started_by=started_by or current_user(),
                wait=wait, notifiers=approval_notifiers(settings, redactor, approval_echo, store))
        if outcome.status is not RunStatus.WAITING:
            report_run(settings, store, outcome.run_id, redactor, post=notify or not dry_run,
                       console=console)
        return outcome
    finally:
        if own_store:
            store.close()


def resume(settings: Settings, store: RunStore, plan: Plan, run: RunRecord,
           observer: Observer | None = None) -> RunOutcome | None:
    """Take a waiting run and go on with it (see `resume`); None if another process took it
    or one of its hosts is in another run now (it stays waiting)."""
    from maintenancebot.resume import host_states

    redactor = redactor_for(settings, plan_secrets(plan))
    store.set_redactor(redactor)
    guard_logs(redactor)
    holder = f"run {run.id}"
    busy = store.acquire_hosts(plan.lease_keys(), holder, plan.runbook.name)
    if busy:
        return None
    try:
        if not store.attach_run(run.id, current_user()):
            return None
        outcome = _engine(settings, store, observer).resume(
            plan, run, host_states(plan, run, store),
            notifiers=approval_notifiers(settings, redactor, None, store))
    finally:
        store.release_hosts(holder)
    if outcome.status is not RunStatus.WAITING:
        report_run(settings, store, outcome.run_id, redactor, post=True, console=None)
    return outcome


def _engine(settings: Settings, store: RunStore, observer: Observer | None,
            transports: TransportFactory | None = None) -> Engine:
    return Engine(store, transports or (lambda host: open_transport(host, settings.ssh)),
                  observer=observer,
                  action_state={"trash_retention": settings.trash_retention})


def approval_notifiers(settings: Settings, redactor: Callable[[str], str],
                       echo: Callable[[str], None] | None,
                       store: RunStore | None = None) -> list[ApprovalNotifier]:
    """The log (or the CLI's terminal), and Slack when a bot token is configured."""
    notifiers: list[ApprovalNotifier] = [LogNotifier(echo)]
    if settings.slack is not None and os.environ.get(settings.slack.token_env):
        from maintenancebot.notify.slack_approvals import SlackApprovals

        notifiers.append(SlackApprovals.from_settings(settings, redactor, store=store))
    return notifiers


@contextmanager
def host_leases(store: RunStore, plan: Plan, run_id: str, *, dry_run: bool) -> Iterator[None]:
    """A host is never in two real runs at once, and a runbook never runs twice at once, from
    the CLI or the daemon (DESIGN §5): the plan's hosts and its runbook are leased for the run,
    or HostsBusy is raised before anything starts. A dry-run only reads, and takes no lease."""
    if dry_run:
        yield
        return
    holder = f"run {run_id}"
    busy = store.acquire_hosts(plan.lease_keys(), holder, plan.runbook.name)
    if busy:
        raise HostsBusy(busy)
    try:
        yield
    finally:
        store.release_hosts(holder)


def inventory_secrets(settings: Settings) -> list[Any]:
    """Host vars of the configured inventory, for redaction outside a run; none if unreadable."""
    if not settings.inventory:
        return []
    try:
        inventory = resolve_inventory(load_inventory(Path(settings.inventory).expanduser()))
    except (ConfigError, OSError):
        return []
    return [[dict(host.vars) for host in inventory.hosts.values()]]


def plan_secrets(plan: Plan) -> list[Any]:
    """What may hold `env:`/`file:` secret references: host vars, runbook vars and `--var`."""
    return [[dict(host.vars) for host in plan.hosts], dict(plan.runbook.vars),
            dict(plan.overrides)]


def current_user() -> str:
    """Who started a run: the login behind sudo if any, so audits name a person, not root."""
    return os.environ.get("SUDO_USER") or getpass.getuser()
