"""`maintenancebot daemon`: the scheduler in the foreground, as systemd (Type=notify) runs it.

Only the command line lives here (options, logging to the journal, exit codes); the daemon
itself is `maintenancebot.daemon`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from maintenancebot.cli import _clean_errors, _State, cli, err, pass_state
from maintenancebot.errors import MaintenanceBotError


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    # local: importing every command module must not load pydantic (models) for other commands
    from maintenancebot.models import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _address(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:9797")
    return host.strip("[]") or "127.0.0.1", int(port)


@cli.command()
@click.option("--poll", "poll", default="2s", show_default=True, callback=_duration,
              help="How often to look for edits of the runbooks and the inventory.")
@click.option("--stop-timeout", default="60s", show_default=True, callback=_duration,
              help="On SIGTERM, how long running steps may take to finish (keep it below "
                   "the unit's TimeoutStopSec).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              callback=lambda _ctx, _param, value: _address(value),
              help="Serve /healthz and /metrics (Prometheus) here, e.g. 127.0.0.1:9797. "
                   "Off by default; read-only.")
@click.option("--git-pull", default=None, metavar="INTERVAL",
              callback=lambda ctx, param, value: value and _duration(ctx, param, value),
              help="The runbooks directory is a git checkout: every INTERVAL (e.g. 5m) fetch, "
                   "validate the new commit apart, and fast-forward only if it is valid whole.")
@pass_state
@_clean_errors
def daemon(state: _State, poll: float, stop_timeout: float,
           listen: tuple[str, int] | None, git_pull: float | None) -> None:
    """Run the scheduler in the foreground (what systemd runs).

    \b
    Schedules every runbook with a `schedule` in the runbooks directory, in its `timezone`.
    A fire missed while the daemon was down runs once at start if within `misfire_grace`
    (marked late); older misses are recorded and reported. A runbook never overlaps itself,
    and a host is never in two runs at once (a run waits for busy hosts until its window
    closes). Edits of runbooks and inventory are picked up after they settle, and on SIGHUP;
    an invalid file is reported and its last valid version keeps its schedule.
    SIGTERM: running steps finish, no new step starts, runs are recorded interrupted; exit 0.
    """
    from maintenancebot.daemon import Daemon

    # The journal adds timestamps; one line per record, INFO and up, so decisions are visible.
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if root.level > logging.DEBUG:  # APScheduler's job bookkeeping is noise; -vv shows it
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    sys.exit(Daemon(state.settings, poll_interval=poll, stop_timeout=stop_timeout,
                    listen=listen, git_pull=git_pull).serve())


@cli.command()
@click.option("--textfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write here, atomically, instead of stdout (node_exporter's textfile "
                   "collector, e.g. /var/lib/prometheus/node-exporter/maintenancebot.prom).")
@pass_state
@_clean_errors
def metrics(state: _State, textfile: Path | None) -> None:
    """Print the run store's metrics in Prometheus text format.

    \b
    For the timer flavour (no daemon, so no /metrics endpoint): maintenancebot-run@.service
    writes this file after every run, and node_exporter's textfile collector serves it.
    """
    from maintenancebot import app
    from maintenancebot.daemon_http import render_metrics

    with app.open_store(state.settings) as store:
        text = render_metrics(store.metrics(), None)
    if textfile is None:
        click.echo(text, nl=False)
        return
    # A scrape must never read half a file: write beside it, then rename over it.
    partial = textfile.with_name(f".{textfile.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text)
        partial.chmod(0o644)
        partial.replace(textfile)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MaintenanceBotError(f"cannot write {textfile}: {exc.strerror or exc}") from exc


@cli.command(short_help="The daemon's decision on each scheduled fire.")
@click.option("--runbook", default=None, help="Only this runbook's fires.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1),
              help="How many fires (newest last).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_state
@_clean_errors
def fires(state: _State, runbook: str | None, limit: int, as_json: bool) -> None:
    """What the daemon decided about each scheduled fire: started, late, skipped, missed, failed.

    \b
    Each line: the fire time, the runbook, the decision, the run it started (see `show`), and
    the reason (why a fire was skipped or missed, or why it ran late).
    """
    from maintenancebot import app

    with app.open_store(state.settings) as store:
        records = store.fires(runbook, limit)
    if as_json:
        click.echo(json.dumps([{"runbook": f.runbook, "fire_time": f.fire_time.isoformat(),
                                "decided_at": f.decided_at.isoformat(), "decision": f.decision,
                                "run_id": f.run_id, "reason": f.reason} for f in records],
                              indent=2))
        return
    if not records:
        err.print("no scheduled fires recorded yet (the daemon records each one)", markup=False)
    for f in records:
        click.echo("  ".join(part for part in (
            f.fire_time.isoformat(timespec="minutes"), f.runbook, f.decision,
            f.run_id or "-", f.reason or "") if part))
