"""`maintenancebot approvals | approve ID | deny ID`: answering approval requests by hand.

Registers its commands on `cli` when imported (one line in `cli.py`). Exit codes follow `cli`:
0 the answer counted, 1 it was refused (not an approver, four eyes, request closed, every
listed host already answered), 2 bad input (no such request, a host it does not list).
Who may answer, and what an answer does, is `maintenancebot.approvals`.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from maintenancebot.cli import (
    EXIT_FAILED,
    EXIT_OK,
    _clean_errors,
    _State,
    cli,
    err,
    out,
    pass_state,
)

if TYPE_CHECKING:  # registering these commands must not load the store or rich's tables
    from rich.table import Table

    from maintenancebot.store_approvals import ApprovalRecord


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Answered and expired requests too.")
@click.option("--run", "run_id", default=None,
              help="Only requests of this run (id, unique prefix or `latest`).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_state
@_clean_errors
def approvals(state: _State, show_all: bool, run_id: str | None, as_json: bool) -> None:
    """List approval requests waiting for an answer, oldest first.

    \b
    Each request shows its run, runbook and step, per host the command it would run, why its
    condition held and, for actions, what they would touch; the deadline (no answer by then
    counts as deny) and the votes so far. Answer with:
      maintenancebot approve ID [--host H ...]      all listed hosts, or some
      maintenancebot deny ID --reason "..."
    """
    from maintenancebot import app

    with app.open_store(state.settings) as store:
        if run_id is not None:
            run_id = store.get_run(run_id).id
        requests = store.list_approvals(status=None if show_all else "open", run_id=run_id)
    docs = [request_document(r) for r in requests]
    if as_json:
        click.echo(json.dumps(docs, indent=2))
    elif not docs:
        err.print("no approval requests waiting" if not show_all else "no approval requests",
                  markup=False)
    elif out.is_terminal:
        out.print(_table(docs))
    else:
        for doc in docs:
            for line in request_lines(doc):
                click.echo(line)


@cli.command(short_help="Approve a request: its hosts run the step as shown.")
@click.argument("request_id", type=int)
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Approve only this host (repeatable); the others stay parked.")
@click.option("--by", "by", default=None,
              help="Who answers (default: the login name); must be in `approvers.cli`.")
@pass_state
@_clean_errors
def approve(state: _State, request_id: int, hosts: tuple[str, ...], by: str | None) -> None:
    """Approve request REQUEST_ID: its parked hosts run the step exactly as shown."""
    _answer(state, request_id, approve=True, hosts=hosts, by=by, reason=None)


@cli.command(short_help="Deny a request: the step is skipped (or per on_deny).")
@click.argument("request_id", type=int)
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Deny only this host (repeatable); the others stay parked.")
@click.option("--reason", default=None, help="Why; recorded and shown in the run.")
@click.option("--by", "by", default=None,
              help="Who answers (default: the login name); must be in `approvers.cli`.")
@pass_state
@_clean_errors
def deny(state: _State, request_id: int, hosts: tuple[str, ...], reason: str | None,
         by: str | None) -> None:
    """Deny request REQUEST_ID: the step is skipped on its hosts (or, per the step's
    `on_deny`, the host is rolled back or the run aborted)."""
    _answer(state, request_id, approve=False, hosts=hosts, by=by, reason=reason)


def _answer(state: _State, request_id: int, *, approve: bool, hosts: tuple[str, ...],
            by: str | None, reason: str | None) -> None:
    from maintenancebot import app
    from maintenancebot.approvals import answer

    with app.open_store(state.settings) as store:
        who = by or app.current_user()
        # `--by` is a claim; the login behind it is what the OS vouches for, so both are kept.
        outcome = answer(state.settings, store, request_id, approve=approve, by=who,
                         channel="cli", hosts=list(hosts) or None, reason=reason,
                         origin={"os_user": getpass.getuser(), "sudo_user":
                                 os.environ.get("SUDO_USER")})
    for host, decision in sorted(outcome.decided.items()):
        click.echo(f"{host}: {decision}")
    for host in outcome.pending:
        click.echo(f"{host}: vote counted; waiting for more approvers (quorum)")
    for host, decision in sorted(outcome.already.items()):
        click.echo(f"{host}: already {decision}; the first answer stands")
    counted = bool(outcome.decided or outcome.pending)
    sys.exit(EXIT_OK if counted else EXIT_FAILED)


# ------------------------------------------------------------------------------ views


def request_document(request: ApprovalRecord) -> dict[str, Any]:
    return {
        "id": request.id, "run_id": request.run_id, "runbook": request.runbook,
        "step": request.step_name, "step_index": request.step_index, "status": request.status,
        "quorum": request.quorum, "on_deny": request.on_deny,
        "started_by": request.started_by, "rollback": request.rollback,
        "opened_at": request.opened_at.isoformat(), "deadline": request.deadline.isoformat(),
        "hosts": [{"host": h.host, "command": h.command, "why": h.why,
                   "preview": (h.preview or {}).get("summary"), "decision": h.decision,
                   "decided_by": h.decided_by, "channel": h.channel, "reason": h.reason,
                   "approvals": h.approvals} for h in request.hosts],
        "votes": [{"host": v.host, "vote": v.vote, "voter": v.voter, "channel": v.channel,
                   "at": v.at.isoformat(), "counted": v.counted} for v in request.votes],
    }


def request_lines(doc: dict[str, Any]) -> list[str]:
    lines = [f"approval {doc['id']} [{doc['status']}] {doc['runbook']} step "
             f"{doc['step_index'] + 1} {doc['step']} (run {doc['run_id']}, started by "
             f"{doc['started_by']}); deadline {_left(doc)}"
             + (f"; quorum {doc['quorum']}" if doc["quorum"] > 1 else "")
             + (f"; on deny: {doc['on_deny']}" if doc["on_deny"] != "skip" else "")]
    for host in doc["hosts"]:
        state = host["decision"] or "waiting"
        if host["decided_by"]:
            state += f" by {host['decided_by']}"
        lines.append(f"  {host['host']}: {state}: {host['command']}")
        if host["why"]:
            lines.append(f"    because {_why(host['why'])}")
        if host["preview"]:
            lines.append(f"    would: {host['preview']}")
    if doc["rollback"]:
        lines.append(f"  rollback: {doc['rollback']}")
    return lines


def _table(docs: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="Approval requests", show_lines=True)
    for column in ("ID", "Run / step", "Hosts: command", "Because", "Deadline"):
        table.add_column(column, overflow="fold")
    for doc in docs:
        hosts = "\n".join(f"{h['host']} ({h['decision'] or 'waiting'}): {h['command']}"
                          + (f"\n  would: {h['preview']}" if h["preview"] else "")
                          for h in doc["hosts"])
        why = "\n".join(f"{h['host']}: {_why(h['why'])}" for h in doc["hosts"] if h["why"])
        table.add_row(str(doc["id"]), f"{doc['runbook']} #{doc['step_index'] + 1} "
                      f"{doc['step']}\n{doc['run_id']}", hosts, why, _left(doc))
    return table


def _why(values: dict[str, Any]) -> str:
    return ", ".join(f"{name}={json.dumps(value, default=str)}" for name, value in values.items())


def _left(doc: dict[str, Any]) -> str:
    """The deadline, and for an open request how long is left (a closed one waits no more)."""
    moment = datetime.fromisoformat(doc["deadline"])
    when = moment.strftime("%Y-%m-%d %H:%M UTC")
    if doc["status"] != "open":
        return when
    minutes = int((moment - datetime.now(UTC)).total_seconds() // 60)
    return f"{when} (in {minutes} min)" if minutes >= 0 else f"{when} (passed)"
