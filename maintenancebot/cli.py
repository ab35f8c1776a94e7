"""The command line: the group, its shared pieces (error handling, consoles, exit codes),
`validate`, the kill switch and `schedule`. With the `cli_*` modules, which register their
commands on this group, the only code that prints for humans and chooses exit codes.

Exit codes are a contract (DESIGN §8): 0 all good, 1 the run finished with failures, 2 bad input
and nothing ran, 3 aborted (breaker, kill switch, timeout, Ctrl-C or SIGTERM, hosts in another
run), 4 waiting for approval. Expected errors print one clean line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from maintenancebot import __version__
from maintenancebot.errors import (
    ConfigError,
    HostsBusy,
    MaintenanceBotError,
    NotFound,
    SelectionError,
    TemplateError,
)
from maintenancebot.terminal import LazyConsole

if TYPE_CHECKING:  # pydantic and the models load with the config, not for `--help`
    from maintenancebot.models import Settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ABORTED, EXIT_WAITING = 0, 1, 2, 3, 4

F = TypeVar("F", bound=Callable[..., Any])

out = LazyConsole(highlight=False, soft_wrap=False)
err = LazyConsole(stderr=True, highlight=False)


def _clean_errors(func: F) -> F:
    """Expected errors become one line on stderr and an exit code; bugs keep their traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            for issue in exc.issues:
                err.print(str(issue), markup=False)
            err.print(f"{len(exc.issues)} problem(s); nothing ran.", style="red", markup=False)
            sys.exit(EXIT_BAD_INPUT)
        except (SelectionError, NotFound, TemplateError) as exc:
            err.print(f"error: {exc}", style="red", markup=False)
            sys.exit(EXIT_BAD_INPUT)
        except HostsBusy as exc:  # refused, as under the kill switch: nothing ran, try later
            err.print(f"error: {exc}", style="red", markup=False)
            sys.exit(EXIT_ABORTED)
        except MaintenanceBotError as exc:
            err.print(f"error: {exc}", style="red", markup=False)
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


class _State:
    def __init__(self, config: Path | None) -> None:
        self._config = config
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from maintenancebot.loader import load_settings

            self._settings = load_settings(self._config)
        return self._settings


pass_state = click.make_pass_decorator(_State)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False),
              envvar="MAINTENANCEBOT_CONFIG",
              help="Config file (default: $MAINTENANCEBOT_CONFIG, then "
                   "/etc/maintenancebot/config.yaml, then built-in defaults).")
@click.option("-v", "--verbose", count=True,
              help="Log more to stderr: -v for what each run does, -vv for debugging.")
@click.version_option(__version__, prog_name="maintenancebot")
@click.pass_context
def cli(ctx: click.Context, config: Path | None, verbose: int) -> None:
    """Run declarative maintenance runbooks over SSH, safely.

    \b
    A typical week:
      maintenancebot validate runbooks/ inventory/        # in CI and as a pre-commit hook
      maintenancebot plan weekly-maintenance -i inventory/prod.yaml   # what would happen
      maintenancebot run  weekly-maintenance -i inventory/prod.yaml   # do it
      maintenancebot approvals                            # steps waiting for a human
      maintenancebot approve 12                           # ... say yes (or: deny 12)
      maintenancebot history                              # what happened
      maintenancebot stop --reason "incident 4711"        # halt every run before its next step

    \b
    Exit codes: 0 all good, 1 finished with failures, 2 bad input (nothing ran),
    3 aborted (circuit breaker, kill switch, timeout, Ctrl-C or SIGTERM, hosts held by
    another run), 4 waiting for approval.
    """
    # Warnings and errors always reach stderr; every record passes the run's redactor first.
    logging.basicConfig(stream=sys.stderr, level=max(logging.DEBUG, logging.WARNING - 10 * verbose),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = _State(config)


@cli.command(short_help="Check runbooks, inventories and config files.")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as a JSON list.")
@pass_state
@_clean_errors
def validate(state: _State, paths: tuple[Path, ...], as_json: bool) -> None:
    """Check runbooks, inventories and config files; print every problem as FILE:LINE: field: msg.

    \b
    PATHS are files or directories (searched for *.yaml / *.yml). Without PATHS the configured
    runbooks directory and inventory are checked. Exits 2 if anything is wrong, so it works as a
    git pre-commit hook:  maintenancebot validate runbooks/ inventory/
    """
    from maintenancebot.loader import validate_paths

    targets = list(paths) or [Path(p) for p in (state.settings.runbooks,
                                                 state.settings.inventory) if p]
    if not targets:
        raise click.UsageError("name files or directories to validate")
    issues = validate_paths(targets)
    if as_json:
        click.echo(json.dumps([vars(i) for i in issues], indent=2))
    else:
        for issue in issues:
            click.echo(str(issue))
        err.print(f"{len(issues)} problem(s)" if issues else "all valid",
                  style="red" if issues else "green", markup=False)
    sys.exit(EXIT_BAD_INPUT if issues else EXIT_OK)


@cli.command(short_help="The kill switch: halt every run before its next step.")
@click.option("--reason", required=True, help="Why; shown in every halted run and the audit.")
@click.option("--by", "by", default=None, help="Who (default: the login name).")
@pass_state
@_clean_errors
def stop(state: _State, reason: str, by: str | None) -> None:
    """The kill switch: every run halts before its next step, and no new run starts.

    Running commands are not killed mid-way; hosts stop at the next step boundary and their
    runs end `aborted`. Lift it with `maintenancebot resume`.
    """
    from maintenancebot import app

    with app.open_store(state.settings) as store:
        store.set_stop(reason, by or app.current_user())
    err.print(f"stopped: {reason}. Runs halt before their next step; `resume` lifts this.",
              style="yellow", markup=False)


@cli.command()
@click.option("--by", "by", default=None, help="Who (default: the login name).")
@pass_state
@_clean_errors
def resume(state: _State, by: str | None) -> None:
    """Lift the kill switch set by `stop`."""
    from maintenancebot import app

    with app.open_store(state.settings) as store:
        was = store.stop_state()
        store.clear_stop(by or app.current_user())
    err.print("resumed" if was else "was not stopped", style="green", markup=False)


@cli.command(short_help="Next fire times of every scheduled runbook.")
@click.option("--count", default=3, show_default=True, help="Fire times to show per runbook.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
@_clean_errors
def schedule(state: _State, count: int, as_json: bool) -> None:
    """Show the next fire times of every scheduled runbook in the runbooks directory."""
    from maintenancebot.loader import load_runbooks
    from maintenancebot.scheduling import next_fire_times

    directory = state.settings.runbooks
    if not directory:
        raise click.UsageError("no runbooks directory configured (set `runbooks` in the config)")
    runbooks, issues = load_runbooks(Path(directory))
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for name, (path, book) in sorted(runbooks.items()):
        times = next_fire_times(book.schedule, book.timezone, now, count) if book.schedule else []
        rows.append({"runbook": name, "file": str(path), "schedule": book.schedule,
                     "timezone": book.timezone, "next": [t.isoformat() for t in times]})
    for issue in issues:
        err.print(str(issue), markup=False)
    if as_json:
        click.echo(json.dumps({"runbooks": rows, "invalid": [str(i) for i in issues]}, indent=2))
    else:
        for row in rows:
            fires = ", ".join(row["next"]) or "manual only"
            click.echo(f"{row['runbook']}: {row['schedule'] or '-'} ({row['timezone']}): {fires}")
    sys.exit(EXIT_BAD_INPUT if issues else EXIT_OK)


# Command groups that live in their own modules register themselves on `cli` when imported.
# (one name per module in this import, added here)
from maintenancebot import (
    cli_approvals,  # noqa: F401
    cli_daemon,  # noqa: F401
    cli_run,  # noqa: F401
    cli_trash,  # noqa: F401
)


def main() -> None:
    try:
        cli(prog_name="maintenancebot")
    finally:
        # What is still alive now dies with the process. Frozen, the interpreter's last garbage
        # collection skips it instead of walking every module's objects: ~0.1 s off each command.
        gc.freeze()
