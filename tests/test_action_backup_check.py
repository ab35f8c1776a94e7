"""The `backup_check` action over real sshd, against files whose ages the test sets (os.utime)
in the fleet host's root directory."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.actions import ActionContext, ActionReport, action_arg_errors
from maintenancebot.actions.backup_check import (
    BackupCheckAction,
    BackupCheckArgs,
    human_age,
    human_size,
)
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport

HOUR = 3600
DAY = 86400


def ctx(dry_run: bool = False) -> ActionContext:
    return ActionContext(run_id="t", step_index=0, step_name="x", sudo=False, timeout=60,
                         dry_run=dry_run)


def aged(path: Path, seconds_old: float, content: bytes = b"x" * 2048) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    stamp = time.time() - seconds_old
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture()
def transport(fleet: Fleet) -> Iterator[Transport]:
    link = open_transport(fleet.hosts[1], fleet.ssh_settings)
    link.connect()
    yield link
    link.close()


@pytest.fixture()
def backups(fleet: Fleet, tmp_path: Path) -> Path:
    root = fleet.root(fleet.names[1]) / f"backups-{tmp_path.name}"
    aged(root / "db" / "db-monday.tar.gz", 3 * DAY)
    aged(root / "db" / "db-saturday.tar.gz", 5 * HOUR, b"y" * 4096)
    aged(root / "files" / "files.tar.gz", 2 * HOUR, b"z" * 100)
    aged(root / "db" / "db.tar.gz.partial", 60, b"")  # an upload still in progress
    os.symlink(root / "db" / "db-saturday.tar.gz", root / "latest")
    return root


def check(transport: Transport, **args: Any) -> ActionReport:
    return BackupCheckAction().apply(transport, BackupCheckArgs.model_validate(args), ctx())


def test_args_are_validated_statically() -> None:
    def errors(args: dict[str, Any]) -> list[str]:
        return [msg for _, msg in action_arg_errors("backup_check", args)]

    assert errors({"path": "/b", "max_age": "1d", "min_size": "10M"}) == []
    assert "exactly one of path, marker or command (got path, marker)" in errors(
        {"path": "/b", "marker": "/m", "max_age": "1d"})[0]
    assert "pattern only applies to path" in errors(
        {"marker": "/m", "pattern": "*.gz", "max_age": "1d"})[0]
    assert "not a command" in errors({"command": "date +%s", "min_size": "1G", "max_age": "1d"})[0]
    assert "invalid size" in errors({"path": "/b", "max_age": "1d", "min_size": "lots"})[0]
    assert errors({"path": "/b"}) == ["Field required"]
    assert errors({"path": "/b", "max_age": "{{ days }}d"}) == []
    assert BackupCheckArgs.model_validate(
        {"path": "/b", "max_age": "1d", "min_size": "1.5G"}).min_size == 3 << 29


def test_fresh_newest_file_passes(transport: Transport, backups: Path) -> None:
    report = check(transport, path=str(backups / "db"), pattern="*.tar.gz", max_age="1d",
                   min_size="1K")
    assert report.ok and not report.changed, report.summary
    data = report.data
    assert data["newest"] == str(backups / "db" / "db-saturday.tar.gz")
    assert abs(data["age_seconds"] - 5 * HOUR) < 60
    assert data["size"] == 4096 and data["stale"] is False and data["reason"] is None
    assert data["files"] == 2  # the .partial upload does not match the pattern
    assert report.summary.startswith(f"backup ok: {data['newest']} is 5h")


def test_search_is_recursive_and_skips_symlinks(transport: Transport, backups: Path) -> None:
    report = check(transport, path=str(backups), max_age="1d")
    assert report.data["newest"] == str(backups / "db" / "db.tar.gz.partial")
    assert report.data["files"] == 4


def test_stale_backup_fails_the_step_with_its_age(transport: Transport, backups: Path) -> None:
    report = check(transport, path=str(backups), pattern="db/*monday*", max_age="2d")
    assert not report.ok and report.data["stale"] is True
    assert report.data["reason"] == "stale: newest backup is 3d old, limit 2d"
    assert report.summary == "backup problem: stale: newest backup is 3d old, limit 2d"


def test_too_small_backup_fails(transport: Transport, backups: Path) -> None:
    report = check(transport, path=str(backups / "files"), max_age="1d", min_size="1K")
    assert not report.ok and report.data["stale"] is False
    assert report.data["reason"] == "too small: 100 B < 1.0 KiB"


def test_missing_directory_or_no_match_is_stale(transport: Transport, backups: Path) -> None:
    gone = check(transport, path=str(backups / "nowhere"), max_age="1d")
    assert not gone.ok and gone.data["stale"] and "is not a directory" in gone.data["reason"]
    empty = check(transport, path=str(backups), pattern="*.sql", max_age="1d")
    assert empty.data["reason"] == f"no file matching *.sql under {backups}"


def test_checksum_of_the_newest_file_is_verified(transport: Transport, backups: Path) -> None:
    newest = backups / "db" / "db-saturday.tar.gz"
    digest = hashlib.sha256(newest.read_bytes()).hexdigest()
    sums = backups / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  db-monday.tar.gz\n{digest}  {newest.name}\n")
    good = check(transport, path=str(backups / "db"), pattern="*.tar.gz", max_age="1d",
                 checksum_file=str(sums))
    assert good.ok and good.data["checksum"] == "ok", good.summary
    sums.write_text(f"{'f' * 64} *{newest.name}\n")
    bad = check(transport, path=str(backups / "db"), pattern="*.tar.gz", max_age="1d",
                checksum_file=str(sums))
    assert not bad.ok and bad.data["reason"] == "checksum mismatch"
    sums.write_text(f"{digest}  something-else.tar.gz\n")
    missing = check(transport, path=str(backups / "db"), pattern="*.tar.gz", max_age="1d",
                    checksum_file=str(sums))
    assert not missing.ok and "no entry for the newest file" in missing.data["reason"]


def test_marker_time_comes_from_its_content_else_its_mtime(
        transport: Transport, backups: Path) -> None:
    marker = aged(backups / "last-success", 10, b"2001-02-03T04:05:06Z\n")
    stale = check(transport, marker=str(marker), max_age="30d")
    assert not stale.ok and stale.data["time_source"] == "content"
    assert stale.data["backup_time"] == "2001-02-03T04:05:06+00:00"
    aged(marker, 2 * HOUR, f"{time.time() - 60:.0f}\n".encode())
    assert check(transport, marker=str(marker), max_age="5m").ok
    aged(marker, 2 * HOUR, b"done\n")
    by_mtime = check(transport, marker=str(marker), max_age="1h")
    assert not by_mtime.ok and by_mtime.data["time_source"] == "mtime"
    assert by_mtime.data["reason"] == "stale: newest backup is 2h old, limit 1h"


def test_command_prints_the_backup_time(transport: Transport, backups: Path) -> None:
    fresh = check(transport, command="date -u -d '-90 min' +%Y-%m-%dT%H:%M:%SZ", max_age="2h")
    assert fresh.ok and abs(fresh.data["age_seconds"] - 5400) < 60, fresh.summary
    assert fresh.data["newest"] is None and fresh.data["time_source"] == "command"
    failing = check(transport, command="echo repository locked >&2; exit 2", max_age="2h")
    assert not failing.ok
    assert failing.data["reason"] == "command exit 2: repository locked"
    garbled = check(transport, command="echo yesterday", max_age="2h")
    assert garbled.data["reason"] == "command printed no epoch or ISO time: yesterday"


def test_paths_with_shell_characters_are_data(transport: Transport, backups: Path) -> None:
    odd = aged(backups / "it's $(touch pwned); x" / "b.tar", 60)
    report = check(transport, path=str(odd.parent), max_age="1h")
    assert report.ok and report.data["newest"] == str(odd)
    assert not (Path.cwd() / "pwned").exists() and not (Path.home() / "pwned").exists()


def test_preview_is_the_same_read_only_check(transport: Transport, backups: Path) -> None:
    args = BackupCheckArgs(path=str(backups), max_age=86400)
    before = sorted(p.name for p in backups.rglob("*"))
    report = BackupCheckAction().preview(transport, args, ctx(dry_run=True))
    assert report.ok and sorted(p.name for p in backups.rglob("*")) == before


def test_human_units() -> None:
    assert human_age(3 * DAY + 4 * HOUR + 5) == "3d 4h"
    assert human_age(42) == "42s" and human_age(0) == "0s"
    assert human_size(100) == "100 B" and human_size(3 << 30) == "3.0 GiB"


def test_dry_run_through_the_engine_really_checks(
        fleet: Fleet, backups: Path, tmp_path: Path) -> None:
    pytest.importorskip("maintenancebot.store", reason="the run store is not written yet")
    from tests.harness import Bench

    bench = Bench(fleet, tmp_path)
    folder = backups.name  # a plain name: safe inside the YAML string
    outcome = bench.run(f"""
        hosts: all
        steps:
          - name: Backups are fresh
            action: backup_check
            with: {{path: "{{{{ root }}}}/{folder}/db", pattern: "*.tar.gz", max_age: 1d}}
    """, dry_run=True)
    host = fleet.names[1]
    step = bench.steps(outcome.run_id, host)[0]
    assert step["status"] == "ok", step  # readonly: it really ran during the dry-run
    assert step["details"]["newest"].endswith("/db/db-saturday.tar.gz")
    others = [bench.steps(outcome.run_id, name)[0] for name in fleet.names if name != host]
    assert all(s["status"] == "failed" and s["details"]["stale"] for s in others)
