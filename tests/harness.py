"""Test helpers: run a runbook text against the real sshd fleet through the real code path
(loader -> plan -> engine -> store -> SSH), and look at the hosts' files afterwards."""

from __future__ import annotations

import hashlib
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maintenancebot import app, views
from maintenancebot.engine import RunOutcome
from maintenancebot.models import Settings
from maintenancebot.prepare import prepare
from maintenancebot.runcontrol import Observer
from maintenancebot.store import RunStore
from maintenancebot.testing.fleet import Fleet


class Bench:
    """One test's workspace: runbook and inventory files, a state dir, settings for the fleet."""

    def __init__(self, fleet: Fleet, tmp: Path, extra_hosts: str = "") -> None:
        self.fleet = fleet
        self.tmp = tmp
        self.inventory = tmp / "inventory.yaml"
        self.inventory.write_text(fleet.inventory_yaml() + extra_hosts)
        self.settings = Settings(state_dir=str(tmp / "state"), ssh=fleet.ssh_settings)

    def write_runbook(self, text: str, name: str = "test") -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def run(self, text: str, *, dry_run: bool = False, narrow: list[str] | None = None,
            observer: Observer | None = None, settings: Settings | None = None) -> RunOutcome:
        path = self.write_runbook(text)
        plan = prepare(settings or self.settings, str(path), str(self.inventory), narrow)
        return app.execute(settings or self.settings, plan, dry_run=dry_run, observer=observer)

    def store(self) -> RunStore:
        return app.open_store(self.settings)

    def document(self, run_id: str) -> dict[str, Any]:
        with self.store() as store:
            return views.run_document(store, run_id)

    def steps(self, run_id: str, host: str) -> list[dict[str, Any]]:
        doc = self.document(run_id)
        return next(h["steps"] for h in doc["hosts"] if h["host"] == host)

    def statuses(self, run_id: str, host: str) -> list[str]:
        return [s["status"] for s in self.steps(run_id, host) if s["kind"] == "step"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` with its type, mode, size, mtime and content hash."""
    result: dict[str, str] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            st = path.lstat()
            content = ""
            if path.is_symlink():
                content = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            result[str(path.relative_to(root))] = f"{st.st_mode:o} {st.st_size} {st.st_mtime_ns} {content}"
    return result


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for `condition`, polling; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
