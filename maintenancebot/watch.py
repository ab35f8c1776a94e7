"""What the daemon schedules: the last valid version of each runbook, and when the files changed.

Owned here: reading the runbooks directory and the inventory into a `Catalog`, keeping the last
valid version of a runbook whose file became invalid (DESIGN §6: a bad edit never breaks the
schedule), and noticing edits. Not here: scheduling, running, SQL, printing.

A `git pull` (or an editor, or a config-management tool) writes files one at a time, so a tree
can be half-written when a poll looks at it. `ChangeWatcher` reports a change only once the
files have looked the same on two polls in a row, and every file is then validated whole
before anything about the schedule changes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from maintenancebot.errors import ConfigError, ConfigIssue
from maintenancebot.inventory import ResolvedInventory, resolve_inventory
from maintenancebot.loader import load_inventory, load_runbooks, validate_paths
from maintenancebot.models import Runbook, Settings
from maintenancebot.plan import RunbookSource
from maintenancebot.prepare import runbook_source
from maintenancebot.yamlsource import yaml_files_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """One runbook as last validated: what its schedule and (as a fallback) its runs use."""

    name: str
    path: Path
    runbook: Runbook
    source: RunbookSource


@dataclass(frozen=True)
class Catalog:
    runbooks: Mapping[str, Accepted] = field(default_factory=dict)
    inventory: ResolvedInventory | None = None


@dataclass(frozen=True)
class Loaded:
    catalog: Catalog
    issues: list[ConfigIssue]
    kept: list[str]  # runbooks whose file is invalid now: their last valid version stays


def load_catalog(settings: Settings, previous: Catalog) -> Loaded:
    """Everything valid now, plus the last valid version of each runbook whose file is not.

    An invalid inventory keeps the whole previous catalog: every plan depends on it."""
    try:
        inventory_path = _inventory_path(settings)
        inventory = resolve_inventory(load_inventory(inventory_path))
    except ConfigError as exc:
        return Loaded(previous, list(exc.issues), sorted(previous.runbooks))
    directory = Path(settings.runbooks or "")
    valid, load_issues = load_runbooks(directory)
    # The same checks as `maintenancebot validate`, host patterns against the inventory included.
    issues = sorted(set(load_issues) | set(validate_paths([directory, inventory_path])),
                    key=lambda i: (i.file, i.line or 0, i.field, i.message))
    bad = {_real(issue.file) for issue in issues}
    runbooks: dict[str, Accepted] = {}
    for name, (path, book) in valid.items():
        if _real(str(path)) not in bad:
            runbooks[name] = Accepted(name, path, book, runbook_source(path))
    kept = []
    for name, old in previous.runbooks.items():
        if name not in runbooks and _real(str(old.path)) in bad:
            runbooks[name] = old
            kept.append(name)
    return Loaded(Catalog(runbooks, inventory), issues, sorted(kept))


def fingerprint(settings: Settings) -> str:
    """A hash of every file the catalog is read from (names and contents)."""
    digest = hashlib.sha256()
    paths: list[Path] = []
    if settings.runbooks and Path(settings.runbooks).is_dir():
        paths += yaml_files_in(Path(settings.runbooks))
    if settings.inventory:
        inventory = Path(settings.inventory).expanduser()
        paths += yaml_files_in(inventory) if inventory.is_dir() else [inventory]
    for path in sorted(paths):
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:  # vanished mid-poll: a change like any other
            digest.update(f"unreadable: {exc}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


class ChangeWatcher:
    """Polls the files; `changed()` is True once a new state has held for two polls."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._applied = fingerprint(settings)
        self._candidate: str | None = None

    def changed(self) -> bool:
        current = fingerprint(self._settings)
        if current == self._applied:
            self._candidate = None
            return False
        if current != self._candidate:
            self._candidate = current  # still being written, perhaps: look again next poll
            return False
        self._applied, self._candidate = current, None
        return True

    def mark_current(self) -> None:
        """A reload just read the files (SIGHUP): do not report the same state again."""
        self._applied, self._candidate = fingerprint(self._settings), None


def _inventory_path(settings: Settings) -> Path:
    if not settings.inventory:
        raise ConfigError([ConfigIssue("config", None, "inventory",
                                       "no inventory configured: the daemon needs one")])
    return Path(settings.inventory).expanduser()


def _real(path: str) -> Path:
    return Path(path).expanduser().resolve()
