"""The `logs` action over real sshd: rotated logs are gzipped with their mode, owner and mtime,
old archives pruned through the trash (newest K kept), the dry-run lists exactly what the real
run touches, symlinks are never followed, and rollback brings the tree back exactly."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.actions import ActionContext, action_arg_errors
from maintenancebot.actions.logs import LogsAction, LogsArgs
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport
from tests.trees import (
    DAY,
    OTHER_UID,
    aged,
    etc_fingerprint,
    files_digest,
    old_link,
    outside_of,
    without_trash,
)

ACTION = LogsAction()


def ctx() -> ActionContext:
    return ActionContext(run_id="logs-run", step_index=2, step_name="logs", sudo=False,
                         timeout=60, dry_run=False)


@pytest.fixture()
def transport(fleet: Fleet) -> Iterator[Transport]:
    link = open_transport(fleet.hosts[2], fleet.ssh_settings)
    link.connect()
    yield link
    link.close()


@pytest.fixture()
def base(fleet: Fleet, tmp_path: Path) -> Path:
    base = fleet.root(fleet.names[2]) / f"logs-{tmp_path.name}"
    aged(base / "outside" / "other.log.1", b"not ours\n", age=9 * DAY)
    logs = base / "logs"
    aged(logs / "app.log", b"live\n", age=60)
    rotated = aged(logs / "app.log.1", b"yesterday\n" * 500, age=2 * DAY, mode=0o640)
    if os.geteuid() == 0:
        os.chown(rotated, OTHER_UID, OTHER_UID)
        aged(rotated, b"yesterday\n" * 500, age=2 * DAY, mode=0o640)  # chown kept; times again
    aged(logs / "app.log.2", b"two days\n" * 300, age=5 * DAY)
    aged(logs / "app.log.3.gz", b"gz3", age=40 * DAY)
    aged(logs / "app.log.4.gz", b"gz4", age=50 * DAY)
    aged(logs / "app.log.5.gz", b"gz5", age=60 * DAY)
    aged(logs / "nested" / "svc.log.1", b"nested\n", age=3 * DAY)
    old_link(logs / "passwd.log.1", "/etc/passwd")
    old_link(logs / "escape.log.1", "../outside/other.log.1")
    return base


def args(base: Path, **extra: Any) -> LogsArgs:
    return LogsArgs.model_validate({"within": [str(base / "logs")], "compress_after": "1d",
                                    "prune_after": "30d", "keep_newest": 1, **extra})


def names(files: list[str], base: Path) -> list[str]:
    return [os.path.relpath(f, base / "logs") for f in files]


def test_logs_compresses_prunes_and_previews_exactly(transport: Transport, base: Path) -> None:
    before, etc = files_digest(base), etc_fingerprint()
    original = (base / "logs" / "app.log.1").stat()

    plan = ACTION.preview(transport, args(base), ctx())
    assert plan.ok and not plan.changed and files_digest(base) == before
    report = ACTION.apply(transport, args(base), ctx())

    assert report.ok and report.changed, report.summary
    assert names(report.data["prune"]["files"], base) == ["app.log.4.gz", "app.log.5.gz"]
    assert names(report.data["compress"]["files"], base) == [
        "app.log.1", "app.log.2", "nested/svc.log.1"]
    for phase in ("prune", "compress"):
        assert report.data[phase]["files"] == plan.data[phase]["files"]
    logs = base / "logs"
    packed = logs / "app.log.1.gz"
    assert gzip.decompress(packed.read_bytes()) == b"yesterday\n" * 500
    st = packed.stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns, st.st_uid) == (
        0o640, original.st_mtime_ns, original.st_uid)
    assert not (logs / "app.log.1").exists() and (logs / "app.log.3.gz").exists()
    assert (logs / "app.log").read_bytes() == b"live\n"  # the live log is never touched
    assert os.readlink(logs / "passwd.log.1") == "/etc/passwd"  # links are not compressed
    after = files_digest(base)
    assert outside_of(after, "logs") == outside_of(before, "logs") and etc_fingerprint() == etc

    undo = ACTION.rollback(transport, args(base), report, ctx())

    assert undo.ok and undo.data["restored"] == 5, undo.summary
    assert without_trash(files_digest(base)) == before  # and the .gz made by the run are gone


def test_logs_in_delete_mode_deletes_pruned_archives_for_good(transport: Transport,
                                                             base: Path) -> None:
    report = ACTION.apply(transport, args(base, mode="delete", compress_after=None), ctx())
    assert report.ok and report.data["bytes_freed"] == 6 and not report.data["trash"]
    assert not (base / "logs" / ".maintenancebot-trash").exists()
    assert sorted(p.name for p in (base / "logs").glob("*.gz")) == ["app.log.3.gz"]


def test_an_existing_gz_is_never_overwritten(transport: Transport, base: Path) -> None:
    aged(base / "logs" / "app.log.2.gz", b"someone else's archive", age=DAY)
    report = ACTION.apply(transport, args(base, prune_after=None), ctx())
    assert not report.ok and "1 file(s) failed" in report.summary
    assert (base / "logs" / "app.log.2.gz").read_bytes() == b"someone else's archive"
    assert (base / "logs" / "app.log.2").read_bytes() == b"two days\n" * 300
    # What the failed step had done already was undone: originals back, its own .gz gone.
    assert report.data["undone"] and not report.changed
    assert (base / "logs" / "app.log.1").read_bytes() == b"yesterday\n" * 500
    assert sorted(p.name for p in (base / "logs").rglob("*.gz")) == [
        "app.log.2.gz", "app.log.3.gz", "app.log.4.gz", "app.log.5.gz"]


def test_log_arguments_are_checked_statically() -> None:
    def errors(given: dict[str, Any]) -> list[str]:
        return [msg for _, msg in action_arg_errors("logs", given)]

    assert errors({"within": ["/var/log/app"]}) == []
    assert "protected floor" in errors({"within": ["/var"]})[0]
    assert "without '/'" in errors({"within": ["/var/log"], "rotated": ["a/*.log"]})[0]
    assert LogsArgs.model_validate({"within": "/srv/lo[g]s"}).globs(["*.gz"]) == [
        "/srv/lo[[]g]s/**/*.gz"]
