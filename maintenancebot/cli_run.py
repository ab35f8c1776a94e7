"""The commands that run runbooks and read runs back: `plan`, `run`, `show`, `history`,
`notify`, and how a run is printed (a table in a terminal, plain lines in a pipe, JSON).

Registers its commands on `cli` when imported (one line in `cli.py`). Exit codes as `cli`
says (DESIGN §8): a run's status chooses them (`_RUN_EXIT`).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from types import FrameType
from typing import Any, TypeVar

import click

from maintenancebot.cli import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    _clean_errors,
    _State,
    cli,
    err,
    out,
    pass_state,
)
from maintenancebot.states import RunStatus

_RUN_EXIT = {RunStatus.SUCCEEDED: EXIT_OK, RunStatus.FAILED: EXIT_FAILED,
             RunStatus.ABORTED: EXIT_ABORTED, RunStatus.INTERRUPTED: EXIT_ABORTED,
             RunStatus.WAITING: EXIT_WAITING}

F = TypeVar("F", bound=Callable[..., Any])


_run_options = [
    click.argument("runbook"),
    click.option("-i", "--inventory", help="Inventory file or directory (default: config)."),
    click.option("--hosts", "narrow", multiple=True, metavar="PATTERN",
                 help="Narrow the runbook's own host selection, e.g. 'web-0*' or 'web:!web-03'. "
                      "Repeatable."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON document on stdout (the run, its hosts, their steps) and no "
                      "progress."),
    click.option("--var", "overrides", multiple=True, metavar="KEY=VALUE",
                 callback=lambda _ctx, _param, value: _parse_vars(value),
                 help="Set a runbook variable for this run, above runbook and inventory vars. "
                      "VALUE is JSON when that loses nothing (true, 3, [\"a\"]); else, like "
                      "1.10 or 007, it stays text. "
                      "Repeatable."),
    click.option("--notify", is_flag=True,
                 help="Post a dry-run's summary to Slack too (real runs always post)."),
]


def _parse_vars(pairs: tuple[str, ...]) -> dict[str, Any]:
    from maintenancebot.models import not_reserved

    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE with KEY a variable name",
                                     param_hint="--var")
        try:
            not_reserved(key)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--var") from None
        parsed[key] = _var_value(value)
    if parsed:
        from maintenancebot.loader import inline_secrets

        # As in a file: a command line is in `ps` and in shell history, and a value the bot
        # does not know as a secret is shown wherever the command that uses it is.
        inline = inline_secrets(parsed)
        if inline:
            key = inline[0].split(".")[0]
            raise click.BadParameter(
                f"{', '.join(inline)}: write secrets as env:NAME or file:/path, never inline "
                f"(e.g. --var {key}=env:{key.upper()})", param_hint="--var")
    return parsed


def _var_value(text: str) -> Any:
    """JSON when reading it so loses nothing, else the text as given: `version=1.10` stays
    "1.10" (JSON's 1.1 would pin another version), and `007`, `1e3` and `NaN` stay text too."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text
    if isinstance(value, int | float) and not isinstance(value, bool) and json.dumps(value) != text:
        return text
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are not JSON


def _with_run_options(func: F) -> F:
    for option in reversed(_run_options):
        func = option(func)
    return func


@cli.command()
@_with_run_options
@pass_state
@_clean_errors
def plan(state: _State, runbook: str, inventory: str | None, narrow: tuple[str, ...],
         as_json: bool, overrides: dict[str, Any], notify: bool) -> None:
    """Dry-run RUNBOOK: show, host by host, what a run would do. Changes nothing.

    \b
    Each step is shown as: would run (with the rendered command), skipped (its `when` was
    false), unknown (its `when` reads a step that a dry-run does not execute: never guessed),
    needs approval, or refused (an action that cannot preview itself). Steps marked
    `readonly: true` really run, so later conditions see real data. Same as `run --dry-run`.
    """
    _run(state, runbook, inventory, narrow, as_json, overrides, dry_run=True, notify=notify)


@cli.command()
@_with_run_options
@click.option("--dry-run", is_flag=True, help="Only show what would happen (same as `plan`).")
@click.option("--no-wait", is_flag=True,
              help="Do not wait for approvals: once every host is done or parked, exit 4 and "
                   "leave the run to the daemon, which goes on when the requests are answered.")
@pass_state
@_clean_errors
def run(state: _State, runbook: str, inventory: str | None, narrow: tuple[str, ...],
        as_json: bool, overrides: dict[str, Any], notify: bool, dry_run: bool,
        no_wait: bool) -> None:
    """Run RUNBOOK on its hosts now.

    \b
    RUNBOOK is a file or a runbook name from the configured runbooks directory. Hosts run in
    parallel up to the runbook's `concurrency`; a failing step rolls back that host's completed
    steps (newest first); `max_failures` stops new hosts from starting. Every step is recorded
    before it runs: see `history` and `show RUN_ID`.

    \b
    A step with `approval:` parks its hosts until an approver answers (`maintenancebot
    approvals`, `approve ID`, `deny ID`, or the Slack buttons); no answer by the deadline
    counts as deny. The run waits here, or with --no-wait is left to the daemon (exit 4).
    """
    _run(state, runbook, inventory, narrow, as_json, overrides, dry_run=dry_run, notify=notify,
         wait=not no_wait)


def _run(state: _State, runbook: str, inventory: str | None, narrow: tuple[str, ...],
         as_json: bool, overrides: dict[str, Any], *, dry_run: bool, notify: bool,
         wait: bool = True) -> None:
    with ExitStack() as closing:
        with _loading():
            from maintenancebot.prepare import prepare
            from maintenancebot.store import RunStore
            from maintenancebot.transports import open_transport
            from maintenancebot.transports.predial import Predial

            settings = state.settings
            the_plan = prepare(settings, runbook, inventory, list(narrow) or None, overrides)
            store = closing.enter_context(RunStore.of_state_dir(settings.state_dir))
            # The first hosts' handshakes go on while the rest of the run loads; nothing runs
            # on a host before its step is recorded (transports.predial). A run that will not
            # start contacts no host at all: not under the kill switch, and not while another
            # run holds its hosts or runbook (a look only: the run still leases them itself).
            refused = store.stop_state() is not None or (
                not dry_run and store.busy_hosts(the_plan.lease_keys()))
            first = () if refused else the_plan.first_hosts()
            dialing = closing.enter_context(Predial(
                first, lambda host: open_transport(host, settings.ssh)))
            from maintenancebot import app, views
            from maintenancebot.progress import LineProgress, LiveProgress

            progress: LiveProgress | LineProgress | None = None
            if not as_json:
                progress = (LiveProgress(err.console, [h.name for h in the_plan.hosts],
                                         len(the_plan.runbook.steps), dry_run)
                            if err.is_terminal else LineProgress(err.file, dry_run))

        def echo(line: str) -> None:  # approval requests, reminders, answers
            err.print(line, style="yellow", markup=False)

        with _signals_stop_between_steps(), nullcontext() if progress is None else progress:
            outcome = app.execute(settings, the_plan, dry_run=dry_run, observer=progress,
                                  store=store, notify=notify, wait=wait, approval_echo=echo,
                                  transports=dialing.open)
        _print_run(views.run_document(store, outcome.run_id), as_json)
        if outcome.status is RunStatus.WAITING and not as_json:
            err.print(f"run {outcome.run_id} waits for approval (see `maintenancebot "
                      "approvals`); the daemon goes on with it once answered.",
                      style="yellow", markup=False)
        elif not as_json:
            _print_summary(store.get_run(outcome.run_id))
    sys.exit(_RUN_EXIT[outcome.status])


@contextmanager
def _loading() -> Iterator[None]:
    """What a run loads (modules, models, the plan: ~70k objects) lives until exit, so a
    collection while loading frees nothing and costs ~10 ms of every start. Once loaded, it is
    frozen, out of the collector's reach: a full collection mid-run walked all of it, ~50 ms
    with every host thread waiting on the GIL."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


@contextmanager
def _signals_stop_between_steps() -> Iterator[None]:
    """The first Ctrl-C or SIGTERM (CI cancelling a job, `timeout`, systemd stopping a unit)
    stops the run as a daemon stop does: steps in flight finish, no host takes another step,
    hosts parked on an approval are left to the daemon (exit 4 then, else 3), and the record
    says why. A second one quits at once, as the signal does by default."""
    from maintenancebot.runcontrol import PROCESS_STOP

    said = {signal.SIGINT: "stopped with Ctrl-C", signal.SIGTERM: "stopped by SIGTERM"}

    def handler(signum: int, frame: FrameType | None) -> None:
        if PROCESS_STOP.reason is not None:
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # Only an assignment here: a handler may run while another thread holds a lock.
        PROCESS_STOP.request(f"{said[signal.Signals(signum)]}: the steps in flight finished, "
                             "no further step started")

    previous = {signum: signal.signal(signum, handler) for signum in said}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
        PROCESS_STOP.clear()


def _print_run(doc: dict[str, Any], as_json: bool) -> None:
    from maintenancebot import views

    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    elif out.is_terminal:
        out.print(views.run_table(doc))
        if doc["dry_run"]:  # below the table, as wide as the terminal (a caption is not)
            for line in views.rollout_lines(doc.get("rollout")):
                out.print(f"{views.DRY} {line}", style="cyan", markup=False)
    else:
        for line in views.run_lines(doc):
            click.echo(line)


def _print_summary(run: Any) -> None:
    if run.summary_text:
        for line in ["", *run.summary_text.rstrip("\n").splitlines()]:
            # Every line of a dry-run's output says so, even when grepped out of context.
            if run.dry_run:
                if not line.strip() or "nothing was changed on any host" in line:
                    continue  # blank, or said already under the table
                line = line if line.startswith("DRY RUN") else f"DRY RUN {line}"
            click.echo(line)
    if run.notify_state == "failed":
        err.print(f"warning: {run.notify_error}", style="yellow", markup=False)


@cli.command(short_help="Send a run's summary again (after notify_failed).")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the delivery result as JSON.")
@pass_state
@_clean_errors
def notify(state: _State, run_id: str, as_json: bool) -> None:
    """Send RUN_ID's summary again (after Slack was down: the run shows notify_failed).
    RUN_ID may be a unique prefix, or `latest`.

    \b
    The stored summary is reused, so a resend costs no LLM tokens and says what the first
    message would have said. Exit 0 when every channel took it, 1 when one still failed.
    """
    from maintenancebot import app, reporting

    settings = state.settings
    with app.open_store(settings) as store:
        run = store.get_run(run_id)
        redactor = reporting.redactor_for(settings, app.inventory_secrets(settings))
        store.set_redactor(redactor)
        report = reporting.report_run(settings, store, run.id, redactor, post=True,
                                      console=None if as_json else sys.stdout, resend=True)
    if as_json:
        click.echo(json.dumps({"run_id": run.id, "notify_state": report.notify_state,
                               "failed": list(report.failed)}))
    elif report.notify_state != reporting.SENT:
        err.print(f"not delivered to: {', '.join(report.failed) or 'anything'}", style="red")
    sys.exit(EXIT_OK if report.notify_state == reporting.SENT else EXIT_FAILED)


@cli.command(short_help="List recent runs, newest first.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many runs to list.")
@click.option("--runbook", default=None, help="Only runs of this runbook.")
@click.option("--status", type=click.Choice([str(s) for s in RunStatus]), default=None,
              help="Only runs that ended (or stand) so.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_state
@_clean_errors
def history(state: _State, limit: int, runbook: str | None, status: str | None,
            as_json: bool) -> None:
    """List recent runs, newest first; interrupted runs name the step that was in flight.

    \b
    Did last Sunday's maintenance go through?
      maintenancebot history --runbook weekly-maintenance --limit 1
    """
    from maintenancebot import app, views

    with app.open_store(state.settings) as store:
        entries = views.history_entries(store, limit, runbook=runbook,
                                        status=None if status is None else RunStatus(status))
    if as_json:
        click.echo(json.dumps(entries, indent=2))
    elif out.is_terminal:
        out.print(views.history_table(entries))
    else:
        for line in views.history_lines(entries):
            click.echo(line)


@cli.command(short_help="Show one run, host by host and step by step.")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON document.")
@pass_state
@_clean_errors
def show(state: _State, run_id: str, as_json: bool) -> None:
    """Show one run host by host and step by step (RUN_ID may be a unique prefix, or
    `latest` for the run started last)."""
    from maintenancebot import app, views

    with app.open_store(state.settings) as store:
        doc = views.run_document(store, run_id)
    _print_run(doc, as_json)
