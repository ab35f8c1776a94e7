"""The controller's view of the trash: what each run moved where, and the by-hand operations on
it (restore a run's files on some hosts, purge what is older than the retention).

Owned here: reading trash entries out of the run store (every `safe_delete`/`logs` step records
its trash dirs, original roots, counts and bytes in its details), their state (trashed, restored
by a rollback or by hand, purged by hand or by a later step that purged expired trash on its
way) from the rollback rows, step details and the audit trail, and writing the audit records of
restores and purges by hand. Not here: touching a file. Restores and purges are requests
to the host-side safe_delete program, which keeps the same rules as a deletion (no symlink
followed, private trash, restores only inside the recorded roots, nothing clobbered); nothing in
this module prints (that is `cli_trash`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from maintenancebot.actions.safe_delete import HelperError, restore_trash, run_helper
from maintenancebot.errors import ConfigError, ConfigIssue, MaintenanceBotError, NotFound
from maintenancebot.models import Host, Settings
from maintenancebot.states import StepStatus
from maintenancebot.store import RunStore
from maintenancebot.transports.base import Transport

TRASH_ACTIONS = ("safe_delete", "logs")
HOST_TIMEOUT = 600.0  # a restore or purge of a big trash reads and hashes every file
AUDIT_SCAN = 100_000
STEP_PURGE_SCAN = 1000  # runs whose steps may have purged expired trash on their way

TransportFactory = Callable[[Host], Transport]


@dataclass(frozen=True)
class TrashEntry:
    """One trash dir on one host: what a step moved there, and what became of it."""

    run_id: str
    host: str
    step_index: int
    step_name: str
    action: str
    trash_dir: str  # for people
    trash_dir_b64: str  # the exact bytes, for the host
    within: tuple[str, ...]
    count: int
    bytes: int
    trashed_at: datetime | None
    state: str  # trashed | restored | purged

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["within"] = list(self.within)
        data["trashed_at"] = self.trashed_at.isoformat() if self.trashed_at else None
        return data

    @property
    def base_b64(self) -> str:
        """The `.maintenancebot-trash` dir that holds this run's trash dir (…/<run>/<step>)."""
        raw = base64.b64decode(self.trash_dir_b64)
        return base64.b64encode(raw.rsplit(b"/", 2)[0]).decode("ascii")


@dataclass(frozen=True)
class HostResult:
    host: str
    ok: bool
    summary: str
    count: int = 0
    bytes: int = 0
    details: dict[str, Any] | None = None


def list_entries(store: RunStore, run_id: str | None = None, host: str | None = None,
                 limit: int = 200) -> list[TrashEntry]:
    """Trash entries of one run (by id or prefix) or of the `limit` latest runs, newest first."""
    runs = [store.get_run(run_id)] if run_id else store.list_runs(limit)
    closed = _closed_dirs(store)
    entries = []
    for run in runs:
        if run.dry_run:
            continue  # a dry-run never moves anything
        steps = store.get_steps(run.id, host)
        restored_rows = {(s.host, s.idx) for s in steps
                         if s.kind == "rollback" and s.status is StepStatus.OK}
        for step in steps:
            details = step.details or {}
            if step.kind != "step" or details.get("action") not in TRASH_ACTIONS:
                continue
            for trash in details.get("trash", []):
                state = closed.get((step.host, trash["dir_b64"]))
                if state is None and (step.host, step.idx) in restored_rows:
                    state = "restored"
                entries.append(_entry(run.id, step, details, trash, state or "trashed"))
    return entries


def _entry(run_id: str, step: Any, details: dict[str, Any], trash: dict[str, str],
           state: str) -> TrashEntry:
    return TrashEntry(
        run_id=run_id, host=step.host, step_index=step.idx, step_name=step.name,
        action=details["action"], trash_dir=trash["dir"], trash_dir_b64=trash["dir_b64"],
        within=tuple(details.get("within", [])), count=int(trash.get("count", details["count"])),
        bytes=int(trash.get("bytes", details["bytes"])), trashed_at=step.finished_at, state=state)


def _closed_dirs(store: RunStore) -> dict[tuple[str, str], str]:
    """(host, trash dir b64) -> restored | purged, from the audit trail (restores and purges by
    hand) and from the steps that purged expired trash as they went (purged wins)."""
    closed: dict[tuple[str, str], str] = {}
    for run in store.list_runs(STEP_PURGE_SCAN):
        if run.dry_run:
            continue  # a dry-run's "purged" is what it would purge
        for step in store.get_steps(run.id):
            for purged in (step.details or {}).get("purged", []):
                closed[(step.host, purged["dir_b64"])] = "purged"
    for record in store.audit_log(limit=AUDIT_SCAN):
        if record.action not in ("trash.restore", "trash.purge") or not record.host:
            continue
        state = "restored" if record.action == "trash.restore" else "purged"
        for dir_b64 in record.details.get("dirs_b64", []):
            if closed.get((record.host, dir_b64)) != "purged":
                closed[(record.host, dir_b64)] = state
    return closed


# ---------------------------------------------------------------------------------- restore


def restore_run(store: RunStore, settings: Settings, run_id: str, *, hosts: list[str] | None,
                actor: str, transports: TransportFactory | None = None) -> list[HostResult]:
    """Put back every file a run moved to the trash, on `hosts` (default: all of its hosts).

    Files that reappeared at their path are reported, never overwritten; an entry already
    restored or purged is skipped."""
    real_id = store.get_run(run_id).id  # an id prefix or `latest` names the run it means
    entries = list_entries(store, real_id)
    if not entries:
        raise NotFound(f"run {real_id} moved nothing to the trash")
    wanted = [e for e in entries if hosts is None or e.host in hosts]
    unknown = sorted(set(hosts or []) - {e.host for e in entries})
    if unknown:
        raise NotFound(f"run {real_id} has no trash on {', '.join(unknown)}")
    results = []
    for host_name, group in _by_host(wanted).items():
        todo = [e for e in group if e.state == "trashed"]
        if not todo:
            results.append(HostResult(host_name, True, "nothing to restore (already "
                                      + "/".join(sorted({e.state for e in group})) + ")"))
            continue
        results.append(_restore_host(store, settings, real_id, host_name, todo, actor, transports))
    return results


def _restore_host(store: RunStore, settings: Settings, run_id: str, host_name: str,
                  todo: list[TrashEntry], actor: str, transports: TransportFactory | None
                  ) -> HostResult:
    try:
        with _connected(settings, host_name, transports) as (host, transport):
            data = {"within": sorted({r for e in todo for r in e.within}),
                    "trash": [{"dir": e.trash_dir, "dir_b64": e.trash_dir_b64} for e in todo]}
            report = restore_trash(transport, data, sudo=host.sudo, timeout=HOST_TIMEOUT)
    except (MaintenanceBotError, HelperError) as exc:
        store.audit("trash.restore.failed", run_id=run_id, host=host_name, actor=actor,
                    details={"error": str(exc), "dirs": [e.trash_dir for e in todo]})
        return HostResult(host_name, False, f"cannot restore: {exc}")
    # Recorded as restored even when some files conflicted: what could come back came back, and
    # the conflicts are named in the audit and in the result.
    store.audit("trash.restore", run_id=run_id, host=host_name, actor=actor, details={
        "dirs": [e.trash_dir for e in todo], "dirs_b64": [e.trash_dir_b64 for e in todo],
        **report.data, "ok": report.ok})
    return HostResult(host_name, report.ok, report.summary, int(report.data["restored"]),
                      int(report.data["bytes"]), dict(report.data))


# ---------------------------------------------------------------------------------- purge


def purge(store: RunStore, settings: Settings, *, older_than: float | None, dry_run: bool,
          actor: str, transports: TransportFactory | None = None,
          now: datetime | None = None) -> list[HostResult]:
    """Remove for good the trash dirs older than `older_than` (default: the configured
    retention). Each host checks the age again against its own manifest, so a trash dir is
    never purged early, and only the dirs of the runs named here are touched."""
    retention = settings.trash_retention if older_than is None else older_than
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=retention)
    due = [e for e in list_entries(store, limit=100_000)
           if e.state != "purged" and e.trashed_at is not None and e.trashed_at <= cutoff]
    results = []
    for host_name, group in _by_host(due).items():
        results.append(_purge_host(store, settings, host_name, group, retention, dry_run, actor,
                                   transports))
    return results


def _purge_host(store: RunStore, settings: Settings, host_name: str, group: list[TrashEntry],
                retention: float, dry_run: bool, actor: str,
                transports: TransportFactory | None) -> HostResult:
    purged: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        with _connected(settings, host_name, transports) as (host, transport):
            for base, entries in _by_base(group).items():
                answer = run_helper(transport, {
                    "op": "purge", "trash_base": {"b64": base}, "retention": retention,
                    "runs": sorted({e.run_id for e in entries}), "dry_run": dry_run,
                }, sudo=host.sudo, timeout=HOST_TIMEOUT)
                purged += answer.get("purged", [])
                errors += [f"{e['path']}: {e['error']}" for e in answer.get("errors", [])]
                if answer.get("error") and not answer.get("errors"):
                    errors.append(str(answer["error"]))
    except (MaintenanceBotError, HelperError) as exc:
        errors.append(str(exc))
    count, size = sum(p["count"] for p in purged), sum(p["bytes"] for p in purged)
    verb = "would purge" if dry_run else "purged"
    summary = f"{verb} {len(purged)} trash dir(s), {count} file(s), {size} bytes"
    if errors:
        summary += f"; {len(errors)} problem(s): {'; '.join(errors[:3])}"
    details = {"dirs": [p["dir"] for p in purged], "dirs_b64": [p["dir_b64"] for p in purged],
               "count": count, "bytes": size, "retention": retention, "errors": errors,
               "runs": sorted({e.run_id for e in group})}
    if not dry_run and (purged or errors):
        store.audit("trash.purge", host=host_name, actor=actor, details=details)
    return HostResult(host_name, not errors, summary, count, size, details)


# ---------------------------------------------------------------------------------- plumbing


def _by_host(entries: Iterable[TrashEntry]) -> dict[str, list[TrashEntry]]:
    grouped: dict[str, list[TrashEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.host, []).append(entry)
    return grouped


def _by_base(entries: Iterable[TrashEntry]) -> dict[str, list[TrashEntry]]:
    grouped: dict[str, list[TrashEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.base_b64, []).append(entry)
    return grouped


@contextmanager
def _connected(settings: Settings, name: str, transports: TransportFactory | None
               ) -> Iterator[tuple[Host, Transport]]:
    """The inventory's host by name and a connected transport to it, closed afterwards."""
    host = inventory_host(settings, name)
    if transports is None:
        from maintenancebot.transports import open_transport

        transport = open_transport(host, settings.ssh)
    else:
        transport = transports(host)
    try:
        transport.connect()
        yield host, transport
    finally:
        transport.close()


def inventory_host(settings: Settings, name: str) -> Host:
    """How to reach `name` today: the store knows which hosts a run touched, the inventory how
    to connect to them."""
    from maintenancebot.inventory import resolve_inventory
    from maintenancebot.loader import load_inventory

    if not settings.inventory:
        raise ConfigError([ConfigIssue("", None, "inventory",
                                       "no inventory configured: cannot reach the hosts")])
    inventory = resolve_inventory(load_inventory(Path(settings.inventory).expanduser()))
    if name not in inventory.hosts:
        raise NotFound(f"host {name!r} is not in the inventory {settings.inventory}")
    return inventory.hosts[name]
