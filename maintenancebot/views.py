"""What a run looks like to people and scripts: one JSON document, plain lines, rich tables.

Built from the store's records only, so `run`, `plan` and `show RUN_ID` print the same thing for
the same run. Pure formatting: nothing here prints or reads the clock.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from maintenancebot.states import RunStatus, StepStatus

if TYPE_CHECKING:  # rich loads only to draw a table on a terminal, never for a piped run
    from rich.table import Table
    from rich.text import Text

    from maintenancebot.store import RunStore

DRY = "DRY RUN"

STATUS_STYLE = {
    "ok": "green", "succeeded": "green", "would_run": "cyan", "skipped": "dim",
    "unknown": "yellow", "needs_approval": "magenta", "refused": "red", "failed": "red",
    "timed_out": "red", "unreachable": "red", "aborted": "red", "interrupted": "yellow",
    "rolled_back": "yellow", "rollback_failed": "bold red", "denied": "magenta",
    "not_started": "dim", "running": "blue", "pending": "dim", "waiting": "magenta",
}


def run_document(store: RunStore, run_id: str) -> dict[str, Any]:
    """The JSON contract of DESIGN §8: run id, status, per host and per step the outcome."""
    run = store.get_run(run_id)
    steps_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for step in store.get_steps(run.id):
        steps_of[step.host].append(_step_entry(step))
    hosts = []
    for host in store.get_hosts(run.id):
        entry: dict[str, Any] = {
            "host": host.host, "address": host.address, "status": str(host.status),
            "error": host.error, "steps": steps_of[host.host],
        }
        if run.dry_run:
            entry = {"label": DRY, **entry}
        hosts.append(entry)
    doc: dict[str, Any] = {
        "run_id": run.id, "runbook": run.runbook, "status": str(run.status),
        "dry_run": bool(run.dry_run), "reason": run.reason, "started_by": run.started_by,
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
        "selection": run.selection, "runbook_sha256": run.runbook_hash,
        "git_commit": run.git_commit, "git_dirty": run.git_dirty,
        "rollout": run.meta.get("rollout"), "hosts": hosts,
    }
    if run.dry_run:
        doc = {"label": DRY, **doc, "changed_nothing": True}
    return doc


def _step_entry(step: Any) -> dict[str, Any]:
    details = step.details or {}
    entry: dict[str, Any] = {
        "index": step.idx, "name": step.name, "kind": step.kind, "status": str(step.status),
        "rc": step.rc, "changed": step.changed, "command": step.command, "error": step.error,
        "started_at": _iso(step.started_at), "finished_at": _iso(step.finished_at),
        # The digest quotes the last lines of a failure's stderr (stored redacted).
        "stderr_tail": step.stderr_tail,
    }
    if "files" in details:
        entry["files"] = details["files"]
    if details:
        entry["details"] = details
    return entry


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.isoformat()


def step_detail(step: dict[str, Any]) -> str:
    """The one thing worth saying about a step: its error, its reason, or its command."""
    status = step["status"]
    if step.get("error"):
        return str(step["error"])
    if status in (StepStatus.WOULD_RUN, StepStatus.OK) and step.get("command"):
        return str(step["command"])
    return str(step.get("command") or "")


def run_lines(doc: dict[str, Any]) -> list[str]:
    """Plain text, one fact a line, for pipes and logs; dry-run lines all carry the label."""
    prefix = f"{DRY} " if doc["dry_run"] else ""
    lines = [f"{prefix}run {doc['run_id']} runbook={doc['runbook']} status={doc['status']}"
             + (f" reason={doc['reason']}" if doc.get("reason") else "")]
    for host in doc["hosts"]:
        lines.append(f"{prefix}host {host['host']} status={host['status']}"
                     + (f" error={_one_line(host['error'])}" if host.get("error") else ""))
        for step in host["steps"]:
            kind = "" if step["kind"] == "step" else f" ({step['kind']})"
            rc = "" if step["rc"] is None else f" rc={step['rc']}"
            lines.append(f"{prefix}  step {step['index'] + 1} {step['name']}{kind}: "
                         f"{step['status']}{rc} {_one_line(step_detail(step))}".rstrip())
    if doc["dry_run"]:
        lines[1:1] = [f"{DRY} {line}" for line in rollout_lines(doc.get("rollout"))]
        lines.append(f"{DRY}: nothing was changed on any host")
    return lines


def rollout_lines(rollout: dict[str, Any] | None) -> list[str]:
    """How a run takes its hosts: batches, hosts at once, the breaker, the check between
    batches, which runs on this controller and not in a dry-run. A change to any of them
    changes what a run does, so a dry-run of a runbook change must show it."""
    if not rollout:
        return []  # a run recorded before rollouts were
    batches, at_once = rollout["batches"], rollout["concurrency"]
    if len(batches) == 1:
        count = len(batches[0])
        lines = [f"rollout: all {count} hosts in one batch, up to {at_once} at once" if count > 1
                 else "rollout: 1 host"]
    else:
        shown = "; ".join(f"batch {number}: {_names(batch)}"
                          for number, batch in enumerate(batches, 1))
        lines = [f"rollout: {shown} (up to {at_once} hosts at once)"]
    if rollout.get("max_failures") is not None:
        allowed = rollout["max_failures"]
        lines.append("circuit breaker: no new host starts once "
                     + ("any host failed" if allowed == 0 else
                        f"more than {allowed} host{'s' if allowed != 1 else ''} failed"))
    if rollout.get("between_batches") and len(batches) > 1:
        lines.append("between batches, on this controller (not in a dry-run): "
                     + _one_line(rollout["between_batches"]))
    return lines


def _names(batch: list[str], most: int = 5) -> str:
    if len(batch) <= most:
        return ", ".join(batch)
    return f"{len(batch)} hosts ({', '.join(batch[:most])}, …)"


def run_table(doc: dict[str, Any]) -> Table:
    from rich.table import Table
    from rich.text import Text

    title = f"{'DRY RUN — ' if doc['dry_run'] else ''}{doc['runbook']}  run {doc['run_id']}"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("host", "#", "step", "status", "detail"):
        table.add_column(column, overflow="fold")
    for host in doc["hosts"]:
        table.add_row(Text(host["host"], style="bold"), "", "", _styled(host["status"]),
                      _one_line(host.get("error") or ""), end_section=not host["steps"])
        for position, step in enumerate(host["steps"]):
            name = step["name"] + ("" if step["kind"] == "step" else f" ({step['kind']})")
            table.add_row("", str(step["index"] + 1), name, _styled(step["status"]),
                          _one_line(step_detail(step), 120),
                          end_section=position == len(host["steps"]) - 1)
    footer = f"status: {doc['status']}" + (f" — {doc['reason']}" if doc.get("reason") else "")
    if doc["dry_run"]:
        footer = f"DRY RUN — nothing was changed on any host. {footer}"
    table.caption = footer
    table.caption_justify = "left"
    return table


def history_table(runs: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="runs", title_justify="left")
    for column in ("run", "runbook", "status", "mode", "started", "by", "note"):
        table.add_column(column, overflow="fold")
    for run in runs:
        table.add_row(run["run_id"], run["runbook"], _styled(run["status"]),
                      DRY if run["dry_run"] else "real", (run["started_at"] or "")[:19],
                      run["started_by"] or "", _one_line(run.get("note") or "", 80))
    return table


def history_lines(runs: list[dict[str, Any]]) -> list[str]:
    return [
        f"{run['run_id']} {run['runbook']} {run['status']} "
        f"{'dry-run' if run['dry_run'] else 'real'} {run['started_at']} "
        f"by={run['started_by']}" + (f" note={_one_line(run['note'])}" if run.get("note") else "")
        for run in runs
    ]


def history_entries(store: RunStore, limit: int, *, runbook: str | None = None,
                    status: RunStatus | None = None) -> list[dict[str, Any]]:
    """Recent runs; an interrupted one names the step that was in flight when it died."""
    entries = []
    for run in store.list_runs(limit=limit, runbook=runbook, status=status):
        note = run.reason or ""
        if str(run.status) == "interrupted":
            step = store.interrupted_step(run.id)
            if step is not None:
                note = f"in flight: {step.host} step {step.idx + 1} {step.name!r}; {note}"
        entries.append({
            "run_id": run.id, "runbook": run.runbook, "status": str(run.status),
            "dry_run": bool(run.dry_run), "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at), "started_by": run.started_by, "note": note,
        })
    return entries


def _styled(status: str) -> Text:
    from rich.text import Text

    label = str(status).replace("_", " ")
    return Text(label, style=STATUS_STYLE.get(str(status), ""))


def _one_line(text: str | None, limit: int = 300) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
