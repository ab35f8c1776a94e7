"""From a runbook reference to a validated Plan: resolve the file, load and validate the runbook
and the inventory, select and batch the hosts. Raises before anything runs and contacts nothing.

Its own module, apart from `app`, because a run's first connections can open as soon as the plan
exists and the store has said the kill switch is off (`transports.predial`): this imports only
what validating and planning need, not the engine or the reporting that load while the
handshakes go on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from maintenancebot.errors import ConfigError, ConfigIssue, NotFound
from maintenancebot.inventory import resolve_inventory
from maintenancebot.loader import load_inventory, load_runbook
from maintenancebot.models import Settings
from maintenancebot.plan import Plan, RunbookSource, build_plan


def resolve_runbook(reference: str, settings: Settings) -> Path:
    """A runbook given as a path, or by name from the configured runbooks directory."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    if settings.runbooks:
        directory = Path(settings.runbooks)
        for candidate in (directory / reference, *(directory / f"{reference}{ext}"
                                                   for ext in (".yaml", ".yml"))):
            if candidate.is_file():
                return candidate
    raise NotFound(f"no runbook {reference!r} (not a file, and not in the runbooks directory "
                   f"{settings.runbooks or '(none configured)'})")


def prepare(
    settings: Settings, runbook_ref: str, inventory_ref: str | None, narrow: list[str] | None,
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Load and validate everything, then plan. Raises before anything runs."""
    path = resolve_runbook(runbook_ref, settings)
    inventory_path = inventory_ref or settings.inventory
    if not inventory_path:
        raise ConfigError([ConfigIssue(str(path), None, "",
                                       "no inventory: pass -i FILE or set `inventory` in the config")])
    inventory = resolve_inventory(load_inventory(Path(inventory_path).expanduser()))
    runbook = load_runbook(path, inventory)  # an unknown host or group: at its line, as validate
    return build_plan(runbook, inventory, runbook_source(path), narrow, overrides)


def runbook_source(path: Path) -> RunbookSource:
    """The runbook's content hash and, inside a git checkout, its commit and dirtiness."""
    source = RunbookSource.from_text(path.resolve(), path.read_bytes())
    commit, dirty = _git_state(path)
    return RunbookSource(source.path, source.sha256, commit, dirty)


def _git_state(path: Path) -> tuple[str | None, bool | None]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path.resolve().parent), *args],
                                  capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--", str(path.resolve()))
    return commit, bool(status)
