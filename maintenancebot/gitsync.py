"""Pull the runbooks from git without ever exposing a half-valid tree (`daemon --git-pull`).

`git pull` writes a new commit's files one by one into the live directory, where the daemon
(or a CLI run) could read a mix of old and new. Here the daemon fetches, checks the fetched
commit out into a private directory, validates it whole (runbooks, and the inventory when it
lives in the same repository), and fast-forwards the live tree only when nothing is wrong. A
rejected commit leaves the live tree on the last good commit and is reported once. Local
commits or edits in the live tree block the pull (reported): a fast-forward is the only move.

Owns: running git for that. Not here: reloading (the daemon does, after a pull), validation
rules (loader), printing.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from maintenancebot.errors import ConfigError
from maintenancebot.loader import load_inventory, validate_paths
from maintenancebot.models import Settings

CURRENT, PULLED, REJECTED, BLOCKED = "current", "pulled", "rejected", "blocked"
GIT_TIMEOUT = 120.0


class GitError(Exception):
    """git failed (no upstream, network, not a checkout): reported, retried next interval."""


@dataclass(frozen=True)
class SyncResult:
    state: str                 # current | pulled | rejected | blocked
    commit: str | None         # the upstream commit looked at
    message: str
    issues: list[str] = field(default_factory=list)


def sync(settings: Settings) -> SyncResult:
    """Fetch, validate the upstream commit apart, fast-forward the live tree if it is valid.

    Raises GitError when git itself fails."""
    directory = Path(settings.runbooks or ".").expanduser().resolve()
    top = Path(_git(directory, "rev-parse", "--show-toplevel"))
    _git(top, "fetch", "--quiet")
    head = _git(top, "rev-parse", "HEAD")
    upstream = _git(top, "rev-parse", "@{upstream}")
    if head == upstream:
        return SyncResult(CURRENT, upstream, "up to date")
    if not _is_ancestor(top, head, upstream):
        return SyncResult(BLOCKED, upstream, f"{top}: local commits not upstream; not pulled "
                          "(only a fast-forward is taken)")
    if _git(top, "status", "--porcelain", "--untracked-files=no"):
        return SyncResult(BLOCKED, upstream, f"{top}: local edits to tracked files; not pulled")
    issues = _problems_in(top, upstream, directory, settings.inventory)
    if issues:
        return SyncResult(REJECTED, upstream, f"commit {upstream[:12]} rejected: "
                          f"{len(issues)} problem(s); the live tree stays on {head[:12]}", issues)
    _git(top, "merge", "--ff-only", "--quiet", upstream)
    return SyncResult(PULLED, upstream, f"fast-forwarded {head[:12]}..{upstream[:12]}")


def _problems_in(top: Path, commit: str, directory: Path, inventory: str | None) -> list[str]:
    """Every validation problem of `commit`, named by its path in the live tree."""
    archive = subprocess.run(["git", "-C", str(top), "archive", "--format=tar", commit],
                             capture_output=True, timeout=GIT_TIMEOUT, check=False)
    if archive.returncode != 0:
        raise GitError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
    with tempfile.TemporaryDirectory(prefix="maintenancebot-git-") as tmp:
        staged = Path(tmp)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(staged, filter="data")  # refuses links out and absolute names
        targets = [staged / directory.relative_to(top)]
        live_inventory = Path(inventory).expanduser().resolve() if inventory else None
        if live_inventory is not None:
            inside = live_inventory.is_relative_to(top)
            targets.append(staged / live_inventory.relative_to(top) if inside
                           else live_inventory)
        issues = [str(issue) for issue in validate_paths(targets)]
        if live_inventory is not None:
            try:
                load_inventory(targets[-1])  # merged-directory checks validate_paths skips
            except ConfigError as exc:
                issues += [str(issue) for issue in exc.issues if str(issue) not in issues]
        return [line.replace(str(staged), str(top)) for line in issues]


def _is_ancestor(top: Path, older: str, newer: str) -> bool:
    done = subprocess.run(["git", "-C", str(top), "merge-base", "--is-ancestor", older, newer],
                          capture_output=True, timeout=GIT_TIMEOUT, check=False)
    return done.returncode == 0


def _git(where: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args)} in {where}: {done.stderr.strip()}")
    return done.stdout.strip()
