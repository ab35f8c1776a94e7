"""`daemon --git-pull`: a commit reaches the live runbooks directory only if it is valid whole.

Real git: a bare "origin", the daemon's checkout (the configured runbooks directory), and an
author's clone that pushes. The fetched commit is validated apart; a bad one never touches the
live tree and is reported once; a good one is fast-forwarded and rescheduled at once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from maintenancebot import gitsync
from maintenancebot.daemon import Daemon
from maintenancebot.models import Settings
from maintenancebot.store import RunStore
from maintenancebot.testing.fleet import Fleet

NIGHTLY = """\
schedule: "0 3 * * *"
hosts: all
steps: [{name: noop, run: "true"}]
"""


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), "-c", "user.name=Ops",
                           "-c", "user.email=ops@example.com", *args],
                          capture_output=True, text=True, check=True, timeout=60).stdout


class Repos:
    def __init__(self, tmp: Path) -> None:
        self.origin, self.live, self.author = tmp / "origin.git", tmp / "live", tmp / "author"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.origin)],
                       check=True)
        subprocess.run(["git", "clone", "-q", str(self.origin), str(self.author)], check=True)
        git(self.author, "checkout", "-q", "-b", "main")
        (self.author / "runbooks").mkdir()
        self.push("runbooks/nightly.yaml", NIGHTLY, "first")
        subprocess.run(["git", "clone", "-q", str(self.origin), str(self.live)], check=True)

    def push(self, path: str, text: str, message: str) -> str:
        (self.author / path).write_text(text)
        git(self.author, "add", path)
        git(self.author, "commit", "-q", "-m", message)
        git(self.author, "push", "-q", "origin", "main")
        return git(self.author, "rev-parse", "HEAD").strip()


@pytest.fixture
def setup(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[Repos, Daemon]]:
    repos = Repos(tmp_path)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(fleet.inventory_yaml())
    settings = Settings(runbooks=str(repos.live / "runbooks"), inventory=str(inventory),
                        state_dir=str(tmp_path / "state"), ssh=fleet.ssh_settings)
    daemon = Daemon(settings)  # sync_git is called by hand: no background interval here
    daemon.start()
    yield repos, daemon
    daemon.stop("test over")


def audit(daemon: Daemon, action: str) -> list[dict[str, object]]:
    return [a.details for a in daemon.store.audit_log() if a.action == action]


def next_hour(daemon: Daemon) -> int:
    fire = daemon.next_fires()["nightly"]
    assert isinstance(fire, datetime)
    return fire.astimezone(UTC).hour


def test_a_valid_commit_is_pulled_and_rescheduled(setup: tuple[Repos, Daemon]) -> None:
    repos, daemon = setup
    assert daemon.sync_git().state == gitsync.CURRENT  # type: ignore[union-attr]
    commit = repos.push("runbooks/nightly.yaml", NIGHTLY.replace("0 3", "0 5"), "later")
    result = daemon.sync_git()
    assert result is not None and (result.state, result.commit) == (gitsync.PULLED, commit)
    assert git(repos.live, "rev-parse", "HEAD").strip() == commit
    assert next_hour(daemon) == 5
    assert audit(daemon, "git.pulled")[0]["commit"] == commit


def test_an_invalid_commit_never_reaches_the_live_tree_and_is_reported_once(
        setup: tuple[Repos, Daemon]) -> None:
    repos, daemon = setup
    live_file = repos.live / "runbooks" / "nightly.yaml"
    before = git(repos.live, "rev-parse", "HEAD").strip()
    # Two files in one commit: one good, one broken. Neither may reach the live tree.
    (repos.author / "runbooks" / "other.yaml").write_text(NIGHTLY)
    git(repos.author, "add", "runbooks/other.yaml")
    bad = repos.push("runbooks/nightly.yaml", NIGHTLY.replace("steps:", "stepz:"), "broken")
    result = daemon.sync_git()
    assert result is not None and result.state == gitsync.REJECTED and result.commit == bad
    assert git(repos.live, "rev-parse", "HEAD").strip() == before
    assert live_file.read_text() == NIGHTLY and not (repos.live / "runbooks/other.yaml").exists()
    (rejected,) = audit(daemon, "git.rejected")
    issues = rejected["issues"]
    assert isinstance(issues, list) and any(
        line.startswith(f"{live_file}:") and "stepz" in line for line in issues), issues
    daemon.sync_git()
    assert len(audit(daemon, "git.rejected")) == 1  # the same bad commit is not re-reported
    assert next_hour(daemon) == 3

    fixed = repos.push("runbooks/nightly.yaml", NIGHTLY.replace("0 3", "0 6"), "fixed")
    result = daemon.sync_git()
    assert result is not None and (result.state, result.commit) == (gitsync.PULLED, fixed)
    assert next_hour(daemon) == 6 and "other" in daemon.catalog.runbooks


def test_local_edits_block_the_pull(setup: tuple[Repos, Daemon]) -> None:
    repos, daemon = setup
    live_file = repos.live / "runbooks" / "nightly.yaml"
    live_file.write_text(NIGHTLY.replace("0 3", "0 4"))  # someone edited the live tree
    repos.push("runbooks/nightly.yaml", NIGHTLY.replace("0 3", "0 5"), "upstream")
    result = daemon.sync_git()
    assert result is not None and result.state == gitsync.BLOCKED
    assert "local edits" in result.message
    assert live_file.read_text() == NIGHTLY.replace("0 3", "0 4")
    assert audit(daemon, "git.blocked")


def test_a_directory_that_is_not_a_checkout_is_reported(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "runbooks").mkdir()
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(fleet.inventory_yaml())
    daemon = Daemon(Settings(runbooks=str(tmp_path / "runbooks"), inventory=str(inventory),
                             state_dir=str(tmp_path / "state")))
    daemon.start()
    try:
        assert daemon.sync_git() is None
        (failed,) = audit(daemon, "git.failed")
        assert "not a git repository" in str(failed["message"])
    finally:
        daemon.stop("test over")
    with RunStore(tmp_path / "state" / "maintenancebot.db") as store:
        assert [a.action for a in store.audit_log()].count("git.failed") == 1
