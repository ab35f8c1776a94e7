"""Approval gates end to end on real sshd hosts: parking, one request per step, answers from
the real CLI in another process, subsets, deny, timeout, quorum and four eyes, on_deny, and an
approval bound to what was shown (the file list grew: it parks again)."""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot import app
from maintenancebot.daemon_http import render_metrics
from maintenancebot.engine import RunOutcome
from maintenancebot.models import Approvers, Settings
from maintenancebot.prepare import prepare
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.store_approvals import ApprovalRecord
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench, until

REPO = Path(__file__).resolve().parent.parent

GATED = """
hosts: all
concurrency: 2
steps:
  - name: count
    run: echo ran >> {{ root }}/count
  - name: flag
    readonly: true
    run: cat {{ root }}/flag 2>/dev/null || echo no
    register: flag
  - name: reboot
    when: "flag.stdout == 'yes'"
    approval: {required: true, timeout: %(timeout)s, on_deny: %(on_deny)s, quorum: %(quorum)d}
    run: touch {{ root }}/rebooted
    rollback: rm -f {{ root }}/rebooted
  - name: after
    run: touch {{ root }}/after
"""


class Gate:
    """A bench whose settings name approvers, a config file for the CLI, and a run in a thread."""

    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.bench = Bench(fleet, tmp)
        self.fleet = fleet
        self.settings = Settings(state_dir=str(tmp / "state"), ssh=fleet.ssh_settings,
                                 approvers=Approvers(cli=["alice", "bob", "carol"]))
        self.config = tmp / "config.yaml"
        self.config.write_text(fleet.config_yaml(tmp / "state", inventory=self.bench.inventory)
                               + "approvers: {cli: [alice, bob, carol]}\n")
        self.outcome: RunOutcome | None = None
        self.lines: list[str] = []
        self._thread: threading.Thread | None = None

    def start(self, text: str, *, started_by: str = "bob", **kwargs: Any) -> None:
        path = self.bench.write_runbook(text)
        plan = prepare(self.settings, str(path), str(self.bench.inventory), None)

        def go() -> None:
            self.outcome = app.execute(self.settings, plan, dry_run=False, started_by=started_by,
                                       approval_echo=self.lines.append, **kwargs)

        self._thread = threading.Thread(target=go)
        self._thread.start()

    def finish(self, timeout: float = 60) -> RunOutcome:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the run did not finish"
        assert self.outcome is not None
        return self.outcome

    def requests(self, status: str | None = None) -> list[ApprovalRecord]:
        with app.open_store(self.settings) as store:
            return store.list_approvals(status=status)

    def await_request(self, count: int = 1, timeout: float = 30) -> ApprovalRecord:
        until(lambda: len(self.requests("open")) >= count, timeout)
        return self.requests("open")[-1]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(self.config), "NO_COLOR": "1"}
        return subprocess.run([sys.executable, "-m", "maintenancebot", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    def has(self, host: str, name: str) -> bool:
        return (self.fleet.root(host) / name).exists()

    def lines_of(self, host: str, name: str) -> list[str]:
        path = self.fleet.root(host) / name
        return path.read_text().splitlines() if path.exists() else []


def fresh_roots(fleet: Fleet) -> None:
    """Every host's root directory, empty: a test sees only what it wrote."""
    for name in fleet.names:
        subprocess.run(["rm", "-rf", str(fleet.root(name))], check=True)
        fleet.root(name).mkdir(parents=True)


@pytest.fixture
def gate(fleet: Fleet, tmp_path: Path) -> Iterator[Gate]:
    fresh_roots(fleet)
    made = Gate(fleet, tmp_path)
    yield made
    with app.open_store(made.settings) as store:  # never leave a run parked behind a test
        for request in store.list_approvals():
            store.close_entries(request.id, None, "cancelled", "test over")
    if made._thread is not None:
        made._thread.join(30)


def gated(timeout: str = "10m", on_deny: str = "skip", quorum: int = 1) -> str:
    return GATED % {"timeout": timeout, "on_deny": on_deny, "quorum": quorum}


def flag(gate: Gate, *hosts: str) -> None:
    for host in hosts:
        (gate.fleet.root(host) / "flag").write_text("yes\n")


def test_only_hosts_whose_condition_holds_park_in_one_request_and_approve_resumes_them(
        gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0], names[1])
    gate.start(gated())
    request = gate.await_request()
    assert sorted(h.host for h in request.hosts) == sorted(names[:2])
    assert request.step_name == "reboot" and request.rollback
    entry = request.entry(names[0])
    assert entry.command and "rebooted" in entry.command
    assert entry.why == {"flag": {"stdout": "yes", "rc": 0, "changed": False, "skipped": False,
                                  "failed": False}}
    # The hosts without the flag went on and finished meanwhile; the parked ones wait.
    until(lambda: all(gate.has(n, "after") for n in names[2:]))
    assert not any(gate.has(n, "rebooted") or gate.has(n, "after") for n in names[:2])
    listed = gate.cli("approvals", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)] == [request.id]
    with app.open_store(gate.settings) as store:
        assert 'maintenancebot_approvals_pending{runbook="test"} 2' in render_metrics(
            store.metrics(), None)
    done = gate.cli("approve", str(request.id), "--by", "alice")
    assert done.returncode == 0, done.stderr
    outcome = gate.finish()
    assert outcome.status is RunStatus.SUCCEEDED
    for name in names:
        assert gate.has(name, "rebooted") == (name in names[:2])
        assert gate.has(name, "after")
        assert gate.lines_of(name, "count") == ["ran"]
    assert len(gate.requests("open")) == 0 and len(gate.requests()) == 1
    assert any(f"approval {request.id}" in line for line in gate.lines)
    with app.open_store(gate.settings) as store:
        audit = [a.action for a in store.audit_log(outcome.run_id)]
        record = store.get_approval(request.id)
    assert "approval.opened" in audit and "approval.approve" in audit
    assert audit.count("approval.executed") == 2
    assert {h.channel for h in record.hosts} == {"cli"}
    assert {h.decided_by for h in record.hosts} == {"alice"}


def test_an_approval_shows_a_secret_masked_in_its_command_and_its_reasons(
        gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Appr0val-Pl4nt-k2Qz"
    monkeypatch.setenv("MB_PLANTED_KEY", secret)
    host = gate.fleet.names[0]
    gate.start(f"""
        hosts: [{host}]
        vars: {{key: env:MB_PLANTED_KEY}}
        steps:
          - name: rotate
            when: "key | length > 3"
            run: echo {{{{ key | lower }}}} > {{{{ root }}}}/rotated
            approval: {{required: true, timeout: 10m}}
    """)
    request = gate.await_request()
    entry = request.entry(host)
    assert entry.command == f"echo '[redacted]' > {gate.fleet.root(host)}/rotated"
    assert entry.why == {"key": "[REDACTED]"}
    listed = gate.cli("approvals", "--json")
    assert secret.lower().encode() not in listed.stdout.encode() and secret not in listed.stdout
    assert gate.cli("approve", str(request.id), "--by", "alice").returncode == 0
    assert gate.finish().status is RunStatus.SUCCEEDED
    assert gate.lines_of(host, "rotated") == [secret.lower()]  # the secret itself ran


def test_an_approval_binds_to_what_its_approvers_saw_not_to_a_secret_they_were_not_shown(
        gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    # The digest is kept in the store and the audit log: one that hashed the secret would let
    # their readers test guesses at it. Two values of the secret, one shown step: one digest.
    host = gate.fleet.names[0]
    runbook = f"""
        hosts: [{host}]
        vars: {{key: env:MB_PLANTED_KEY}}
        steps:
          - name: check
            action: backup_check
            with: {{command: "KEY={{{{ key }}}} date +%s", max_age: 1h}}
            approval: {{required: true, timeout: 10m}}
    """
    digests = []
    for secret in ("Digest-Pl4nt-0ne-x7Q", "Digest-Pl4nt-Tw0-y8R"):
        monkeypatch.setenv("MB_PLANTED_KEY", secret)
        gate.start(runbook)
        request = gate.await_request()
        entry = request.entry(host)
        # The action's arguments as the runbook says them, the secret masked:
        assert entry.command == "backup_check {command: 'KEY=[REDACTED] date +%s', max_age: 1h}"
        digests.append(entry.digest)
        assert gate.cli("deny", str(request.id), "--by", "alice").returncode == 0
        assert gate.finish().status is RunStatus.SUCCEEDED
    assert digests[0] == digests[1]


def test_deny_skips_the_step_and_the_hosts_finish(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0])
    gate.start(gated())
    request = gate.await_request()
    done = gate.cli("deny", str(request.id), "--reason", "not today", "--by", "carol")
    assert done.returncode == 0, done.stderr
    outcome = gate.finish()
    assert outcome.status is RunStatus.SUCCEEDED
    assert not gate.has(names[0], "rebooted") and gate.has(names[0], "after")
    step = next(s for s in gate.bench.steps(outcome.run_id, names[0]) if s["name"] == "reboot")
    assert step["status"] == "denied" and "carol" in step["error"] and "not today" in step["error"]
    # Listed afterwards, a closed request shows its deadline but no countdown to it.
    (line,) = [line for line in gate.cli("approvals", "--all").stdout.splitlines()
               if line.startswith(f"approval {request.id} ")]
    assert "[closed]" in line and " min)" not in line and "(passed)" not in line
    assert re.search(r"; deadline \d{4}-\d\d-\d\d \d\d:\d\d UTC$", line), line


def test_no_answer_before_the_deadline_counts_as_deny_after_a_reminder(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0])
    gate.start(gated(timeout="6s"))  # the reminder at 4.5 s: margin for a loaded machine
    outcome = gate.finish()
    assert outcome.status is RunStatus.SUCCEEDED
    assert not gate.has(names[0], "rebooted") and gate.has(names[0], "after")
    request = gate.requests(None)[0]
    assert request.entry(names[0]).decision == "expired"
    step = next(s for s in gate.bench.steps(outcome.run_id, names[0]) if s["name"] == "reboot")
    assert step["status"] == "denied" and "expired" in step["error"]
    assert any(line.startswith("reminder") for line in gate.lines)


def test_approve_host_releases_a_subset_and_the_rest_stay_parked(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0], names[1])
    gate.start(gated())
    request = gate.await_request()
    done = gate.cli("approve", str(request.id), "--host", names[0], "--by", "alice")
    assert done.returncode == 0, done.stderr
    until(lambda: gate.has(names[0], "after"))
    assert gate.has(names[0], "rebooted")
    time.sleep(1.0)
    assert not gate.has(names[1], "rebooted") and not gate.has(names[1], "after")
    assert gate.requests("open")[0].waiting == [names[1]]
    done = gate.cli("deny", str(request.id), "--by", "alice")
    assert done.returncode == 0, done.stderr
    gate.finish()
    assert not gate.has(names[1], "rebooted") and gate.has(names[1], "after")


def test_four_eyes_approver_list_quorum_and_first_answer_kept(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0])
    gate.start(gated(quorum=2), started_by="bob")
    request = gate.await_request()
    mine = gate.cli("approve", str(request.id), "--by", "bob")
    assert mine.returncode == 1 and "four eyes" in mine.stderr
    stranger = gate.cli("approve", str(request.id), "--by", "mallory")
    assert stranger.returncode == 1 and "not an approver" in stranger.stderr
    unknown = gate.cli("approve", "999999", "--by", "alice")
    assert unknown.returncode == 2
    first = gate.cli("approve", str(request.id), "--by", "alice")
    assert first.returncode == 0 and "quorum" in first.stdout
    again = gate.cli("approve", str(request.id), "--by", "alice")  # one person, one vote
    assert again.returncode == 0 and "quorum" in again.stdout
    time.sleep(0.8)
    assert not gate.has(names[0], "rebooted")
    second = gate.cli("approve", str(request.id), "--by", "carol")
    assert second.returncode == 0 and "approved" in second.stdout
    outcome = gate.finish()
    assert gate.has(names[0], "rebooted")
    late = gate.cli("deny", str(request.id), "--by", "carol")
    assert late.returncode == 1 and "already closed" in late.stderr
    with app.open_store(gate.settings) as store:
        record = store.get_approval(request.id)
        refused = [a for a in store.audit_log(outcome.run_id) if a.action == "approval.refused"]
    assert record.entry(names[0]).decision == "approved"
    assert [(v.voter, v.counted) for v in record.votes] == [("alice", True), ("alice", False),
                                                            ("carol", True)]
    assert sorted(a.actor or "" for a in refused) == ["bob", "carol", "mallory"]
    # `--by` is what the caller claims; the OS user who ran the command is kept beside it.
    assert {a.details["os_user"] for a in refused} == {getpass.getuser()}


def test_on_deny_rollback_undoes_the_host_and_abort_stops_the_run(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0])
    gate.start(gated(on_deny="rollback").replace(
        "run: echo ran >> {{ root }}/count",
        "run: echo ran >> {{ root }}/count\n    rollback: echo undone >> {{ root }}/count"))
    request = gate.await_request()
    assert gate.cli("deny", str(request.id), "--by", "alice").returncode == 0
    outcome = gate.finish()
    assert outcome.hosts[names[0]] is HostStatus.FAILED
    assert gate.lines_of(names[0], "count") == ["ran", "undone"]
    assert not gate.has(names[0], "after")
    assert all(outcome.hosts[n] is HostStatus.SUCCEEDED for n in names[1:])

    for name in names:
        subprocess.run(["rm", "-rf", str(gate.fleet.root(name) / "after")], check=True)
    gate.start(gated(on_deny="abort"))
    request = gate.await_request(count=1)
    assert gate.cli("deny", str(request.id), "--by", "alice").returncode == 0
    outcome = gate.finish()
    assert outcome.status is RunStatus.ABORTED
    assert "on_deny: abort" in (outcome.reason or "")


def test_an_approval_binds_to_what_was_shown_a_grown_file_list_parks_again(gate: Gate) -> None:
    host = gate.fleet.names[0]
    root = gate.fleet.root(host)
    (root / "old").mkdir()
    (root / "old" / "a.log").write_text("a")
    os.utime(root / "old" / "a.log", (1, 1))
    gate.start(f"""
        hosts: {host}
        steps:
          - name: prune
            approval: {{required: true, timeout: 10m}}
            action: safe_delete
            with:
              paths: ["{{{{ root }}}}/old/*.log"]
              within: ["{{{{ root }}}}/old"]
              min_age: 1s
    """)
    first = gate.await_request()
    assert "a.log" in json.dumps(first.entry(host).preview)
    (root / "old" / "b.log").write_text("b")  # the world changed after the approver looked
    os.utime(root / "old" / "b.log", (1, 1))
    assert gate.cli("approve", str(first.id), "--by", "alice").returncode == 0
    second = gate.await_request()
    assert second.id != first.id and "b.log" in json.dumps(second.entry(host).preview)
    assert (root / "old" / "a.log").exists(), "nothing ran on the stale approval"
    assert gate.cli("approve", str(second.id), "--by", "alice").returncode == 0
    outcome = gate.finish()
    assert outcome.status is RunStatus.SUCCEEDED
    assert not (root / "old" / "a.log").exists() and not (root / "old" / "b.log").exists()


def test_dry_run_shows_needs_approval_for_the_hosts_that_would_park(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[1])
    outcome = gate.bench.run(gated(), dry_run=True)
    for name in names:
        reboot = next(s for s in gate.bench.steps(outcome.run_id, name) if s["name"] == "reboot")
        assert reboot["status"] == ("needs_approval" if name == names[1] else "skipped")
    assert gate.requests(None) == []


def test_ctrl_c_while_hosts_wait_leaves_the_run_to_the_daemon_with_exit_4(gate: Gate) -> None:
    names = gate.fleet.names
    flag(gate, names[0])
    path = gate.bench.write_runbook(gated())
    env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(gate.config), "NO_COLOR": "1"}
    waiting = subprocess.Popen([sys.executable, "-m", "maintenancebot", "run", str(path)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        request = gate.await_request()
        until(lambda: all(gate.has(n, "after") for n in names[1:]))
        waiting.send_signal(signal.SIGINT)
        _, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 4, stderr
    assert "waits for approval" in stderr
    with app.open_store(gate.settings) as store:
        run = store.list_runs(limit=1)[0]
        hosts = {h.host: h.status for h in store.get_hosts(run.id)}
        assert store.list_approvals()[0].id == request.id, "still answerable"
    assert run.status is RunStatus.WAITING
    assert hosts[names[0]] is HostStatus.WAITING
    assert all(hosts[n] is HostStatus.SUCCEEDED for n in names[1:])
