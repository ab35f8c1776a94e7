"""`maintenancebot trash list | restore | purge`: the trash by hand.

Registers the `trash` group on `cli` when imported (one line in `cli.py`). Printing and exit codes
follow `cli`: a table in a terminal, plain lines when piped, one JSON document with --json; exit
0 when every host did what was asked, 1 when a host failed, 2 for bad input (unknown run or host).
The work itself is `maintenancebot.trash`.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from maintenancebot.cli import EXIT_FAILED, EXIT_OK, _clean_errors, _State, cli, out, pass_state

# Imports are local to the commands below, so that registering `trash` on `cli` costs every other
# command (a `run` above all) nothing: not the actions, not pydantic, not rich's tables.
if TYPE_CHECKING:
    from rich.table import Table


@cli.group(short_help="List, restore and purge what runs moved to the trash.")
def trash() -> None:
    """What runs moved to the trash: list it, restore it by hand, purge it after retention."""


@trash.command("list", short_help="List trash entries, newest run first.")
@click.option("--run", "run_id", default=None,
              help="Only this run (id, unique prefix or `latest`).")
@click.option("--host", "host", default=None, help="Only this host.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1),
              help="Runs to look at (without --run).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_state
@_clean_errors
def list_(state: _State, run_id: str | None, host: str | None, limit: int, as_json: bool
          ) -> None:
    """List trash entries: run, host, step, files, bytes, state, where they are.

    Steps are numbered from 1 as in `show`; --json gives the 0-based `step_index`."""
    from maintenancebot import app
    from maintenancebot.actions.backup_check import human_size
    from maintenancebot.trash import list_entries

    with app.open_store(state.settings) as store:
        entries = [e.as_dict() for e in list_entries(store, run_id, host, limit)]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
    elif out.is_terminal:
        out.print(_table(entries))
    else:
        for e in entries:
            click.echo(f"{e['run_id']}  {e['host']}  step {e['step_index'] + 1} {e['step_name']}  "
                       f"{e['count']} file(s) {human_size(e['bytes'])}  {e['state']}  "
                       f"{e['trash_dir']}")
        if not entries:
            click.echo("no trash entries")


def _table(entries: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    from maintenancebot.actions.backup_check import human_size

    table = Table("run", "host", "step", "files", "size", "state", "trash dir", title="trash")
    for e in entries:
        table.add_row(e["run_id"], e["host"], f"{e['step_index'] + 1} {e['step_name']}",
                      str(e["count"]), human_size(e["bytes"]), e["state"], e["trash_dir"])
    return table


@trash.command(short_help="Put back every file a run moved to the trash.")
@click.argument("run_id")
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable).")
@click.option("--by", "by", default=None, help="Who (default: the login name), for the audit.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-host results as JSON.")
@pass_state
@_clean_errors
def restore(state: _State, run_id: str, hosts: tuple[str, ...], by: str | None,
            as_json: bool) -> None:
    """Put back every file RUN_ID (id, unique prefix or `latest`) moved to the trash (never
    over a file that is back)."""
    from maintenancebot import app
    from maintenancebot.trash import restore_run

    with app.open_store(state.settings) as store:
        results = restore_run(store, state.settings, run_id, hosts=list(hosts) or None,
                              actor=by or app.current_user())
    _print_results(results, as_json)


@trash.command(short_help="Delete for good the trash past its retention.")
@click.option("--older-than", "older_than", default=None,
              help="Age past which trash goes for good (default: the configured trash_retention).")
@click.option("--dry-run", is_flag=True, help="Only say what would be purged.")
@click.option("--by", "by", default=None, help="Who (default: the login name), for the audit.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-host results as JSON.")
@pass_state
@_clean_errors
def purge(state: _State, older_than: str | None, dry_run: bool, by: str | None,
          as_json: bool) -> None:
    """Delete for good the trash older than the retention; nothing else is touched."""
    from maintenancebot import app
    from maintenancebot.models import parse_duration
    from maintenancebot.trash import purge as purge_trash

    try:
        seconds = None if older_than is None else parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    with app.open_store(state.settings) as store:
        results = purge_trash(store, state.settings, older_than=seconds, dry_run=dry_run,
                              actor=by or app.current_user())
    if not results and not as_json:
        click.echo("nothing is older than the retention")
    _print_results(results, as_json)


def _print_results(results: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{"host": r.host, "ok": r.ok, "summary": r.summary,
                                "count": r.count, "bytes": r.bytes} for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"{r.host}: {'ok' if r.ok else 'FAILED'}: {r.summary}")
    sys.exit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)
