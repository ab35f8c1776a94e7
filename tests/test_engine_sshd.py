"""The engine end to end against real OpenSSH sshd hosts on loopback: parallel hosts, registers,
rollback, unreachable and wrong-key hosts, timeouts, the breaker, the kill switch, dry-runs."""

from __future__ import annotations

import subprocess
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from maintenancebot.engine import RunOutcome
from maintenancebot.runcontrol import Event
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench, tree_digest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(fleet: Fleet, tmp_path: Path) -> Bench:
    for name in fleet.names:
        for child in fleet.root(name).iterdir() if fleet.root(name).exists() else []:
            subprocess.run(["rm", "-rf", str(child)], check=True)
        fleet.root(name).mkdir(parents=True, exist_ok=True)
    return Bench(fleet, tmp_path)


def test_five_steps_run_on_every_host_in_parallel(bench: Bench) -> None:
    outcome = bench.run("""
        hosts: all
        concurrency: 10
        steps:
          - {name: uptime, run: uptime}
          - {name: disk, run: df -P /}
          - {name: wait, run: sleep 1}
          - {name: mark, run: 'echo {{ host.name }} > {{ root }}/mark'}
          - {name: check, run: 'test -f {{ root }}/mark'}
    """)
    assert outcome.status is RunStatus.SUCCEEDED
    assert set(outcome.hosts.values()) == {HostStatus.SUCCEEDED}
    waits = [next(s for s in bench.steps(outcome.run_id, h) if s["name"] == "wait")
             for h in bench.fleet.names]
    starts = [datetime.fromisoformat(w["started_at"]) for w in waits]
    ends = [datetime.fromisoformat(w["finished_at"]) for w in waits]
    assert max(starts) < min(ends), "the 1 s sleeps of all hosts overlapped in time"
    for name in bench.fleet.names:
        assert (bench.fleet.root(name) / "mark").read_text().strip() == name


def test_each_step_is_on_disk_as_running_before_its_command_runs(bench: Bench) -> None:
    """The command asks the store from another process, which sees only committed rows."""
    look = bench.tmp / "look.py"
    look.write_text("import sqlite3, sys\n"
                    "print(*sqlite3.connect(sys.argv[1]).execute('SELECT status FROM steps "
                    "WHERE host = ? AND name = ?', sys.argv[2:]).fetchone())\n")
    command = f"python3 {look} {bench.tmp / 'state' / 'maintenancebot.db'} {{{{ host.name }}}}"
    outcome = bench.run("steps:\n" + "".join(
        f"  - name: {name}\n    run: '{command} {name}'\n" for name in ("first", "second", "third")))
    assert outcome.status is RunStatus.SUCCEEDED
    with bench.store() as store:
        for name in bench.fleet.names:
            assert [s.stdout_tail for s in store.get_steps(outcome.run_id, name)] == \
                ["running\n"] * 3


def test_one_connection_per_host_serves_every_step(bench: Bench) -> None:
    before = {name: bench.fleet.logins(name) for name in bench.fleet.names}
    outcome = bench.run("""
        steps:
          - {name: one, run: 'true'}
          - {name: two, run: 'true'}
          - {name: three, run: 'true'}
          - {name: four, run: 'true'}
    """)
    assert outcome.status is RunStatus.SUCCEEDED
    time.sleep(0.2)  # sshd writes its log line asynchronously
    assert {name: bench.fleet.logins(name) - before[name] for name in bench.fleet.names} == {
        name: 1 for name in bench.fleet.names}


def test_registered_output_feeds_a_later_when(bench: Bench) -> None:
    first = bench.fleet.names[0]
    (bench.fleet.root(first) / "flag").write_text("yes\n")
    outcome = bench.run("""
        steps:
          - name: read flag
            run: cat {{ root }}/flag 2>/dev/null || echo no
            register: flag
          - name: act on flag
            when: "flag.stdout == 'yes'"
            run: touch {{ root }}/acted
    """)
    assert outcome.status is RunStatus.SUCCEEDED
    assert bench.statuses(outcome.run_id, first) == ["ok", "ok"]
    assert (bench.fleet.root(first) / "acted").exists()
    for other in bench.fleet.names[1:]:
        assert bench.statuses(outcome.run_id, other) == ["ok", "skipped"]
        assert not (bench.fleet.root(other) / "acted").exists()


def test_failing_step_rolls_back_its_host_in_reverse_order_and_others_finish(bench: Bench) -> None:
    victim = bench.fleet.names[1]
    outcome = bench.run(f"""
        steps:
          - name: first
            run: echo do1 >> {{{{ root }}}}/log
            rollback: echo undo1 >> {{{{ root }}}}/log
          - name: second
            run: echo do2 >> {{{{ root }}}}/log
            rollback: echo undo2 >> {{{{ root }}}}/log
          - name: breaks on one host
            run: test {{{{ host.name }}}} != {victim}
          - name: never reached there
            run: echo do4 >> {{{{ root }}}}/log
    """)
    assert outcome.status is RunStatus.FAILED
    assert outcome.hosts[victim] is HostStatus.FAILED
    log = (bench.fleet.root(victim) / "log").read_text().split()
    assert log == ["do1", "do2", "undo2", "undo1"]
    steps = bench.steps(outcome.run_id, victim)
    assert [s["status"] for s in steps if s["kind"] == "step"] == [
        "rolled_back", "rolled_back", "failed", "skipped"]
    assert [s["command"] for s in steps if s["kind"] == "rollback"] == [
        f"echo undo2 >> {bench.fleet.root(victim)}/log", f"echo undo1 >> {bench.fleet.root(victim)}/log"]
    for other in bench.fleet.names:
        if other != victim:
            assert outcome.hosts[other] is HostStatus.SUCCEEDED
            assert (bench.fleet.root(other) / "log").read_text().split() == ["do1", "do2", "do4"]


def run_with_planted(bench: Bench, monkeypatch: pytest.MonkeyPatch, secret: str,
                     steps: str) -> tuple[RunOutcome, str]:
    """`steps` run on the first host, whose var `token` is `secret` by reference (env:)."""
    monkeypatch.setenv("MB_PLANTED", secret)
    host = bench.fleet.names[0]
    runbook = f"hosts: [{host}]\nvars: {{token: env:MB_PLANTED}}\nsteps:\n"
    return bench.run(runbook + textwrap.indent(textwrap.dedent(steps), "  ")), host


def assert_nowhere_stored(bench: Bench, *forms: str) -> None:
    written = b"".join(p.read_bytes() for p in (bench.tmp / "state").rglob("*") if p.is_file())
    for form in forms:
        assert form.encode() not in written, form


def test_a_secret_runs_in_commands_but_their_records_show_it_masked_whatever_the_filter(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Pl4nt-Tok3n-xq81Zv"
    outcome, host = run_with_planted(bench, monkeypatch, secret, """
        - name: keep
          run: echo {{ token | upper }}{{ token[3:] }} > {{ root }}/kept
          rollback: echo {{ token | reverse }} > {{ root }}/undone
        - {name: fails, run: 'false'}
    """)
    assert outcome.status is RunStatus.FAILED
    root = bench.fleet.root(host)
    # What ran had the secret itself, transformed as the templates say:
    assert (root / "kept").read_text() == secret.upper() + secret[3:] + "\n"
    assert (root / "undone").read_text() == secret[::-1] + "\n"
    steps = bench.steps(outcome.run_id, host)
    assert [s["command"] for s in steps if s["name"] == "keep"] == [
        f"echo '[REDACTED]''DACTED]' > {root}/kept", f"echo ']DETCADER[' > {root}/undone"]
    assert_nowhere_stored(bench, secret, secret.upper(), secret[3:], secret[::-1])


def test_a_render_error_never_quotes_a_secret(bench: Bench,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Err0r-Pl4nt-7vQm"
    outcome, host = run_with_planted(bench, monkeypatch, secret, """
        - {name: keep, run: "true", rollback: "echo {{ {}[token | title] }}"}
        - {name: quotes, run: "echo {{ {}[token | upper] }}", on_failure: continue}
        - {name: asks, when: "{}[token | lower] == 1", run: "true", on_failure: continue}
        - {name: args, action: safe_delete, with: {paths: ["{{ token }}/*"], within: /srv},
           on_failure: continue}
        - {name: depends, run: "echo {{ {'[REDACTED]': 1}[token] }}"}
    """)
    assert outcome.status is RunStatus.FAILED
    steps = bench.steps(outcome.run_id, host)
    errors = {s["name"]: s["error"] for s in steps if s["kind"] == "step"}
    (undo,) = [s for s in steps if s["kind"] == "rollback"]
    assert undo["error"] == "undefined variable: 'dict object' has no attribute '[Redacted]'"
    assert errors["quotes"] == ("cannot render: undefined variable: 'dict object' has no "
                                "attribute '[REDACTED]'")
    assert errors["asks"] == ("when: undefined variable: 'dict object' has no attribute "
                              "'[redacted]'")
    assert errors["args"] == "cannot render: with.paths: glob is not an absolute path: [REDACTED]/*"
    assert errors["depends"] == ("cannot render: the error depends on a secret's value, so its "
                                 "message is not shown")
    assert_nowhere_stored(bench, secret, secret.upper(), secret.lower(), secret.title())


def test_a_step_that_floods_its_output_keeps_its_last_megabytes(bench: Bench) -> None:
    host = bench.fleet.names[0]
    outcome = bench.run(f"""
        hosts: [{host}]
        steps:
          - {{name: flood, run: 'seq 1 2000000', register: flood, readonly: true}}
          - name: look
            when: "flood.stdout_lines[0].startswith('[maintenancebot: ') and
                   flood.stdout_lines[-1] == '2000000' and flood.stdout | length < 4200000"
            run: touch {{{{ root }}}}/kept-the-end
    """)
    assert outcome.status is RunStatus.SUCCEEDED
    assert (bench.fleet.root(host) / "kept-the-end").exists()


def test_unreachable_and_wrong_key_hosts_fail_alone_with_clear_reasons(
    fleet: Fleet, tmp_path: Path
) -> None:
    ghost = '  ghost: {address: "127.0.0.1", port: 9, vars: {root: /nonexistent}}\n'
    bench = Bench(fleet, tmp_path, extra_hosts=ghost)
    impostor = fleet.names[-1]
    settings = bench.settings.model_copy(update={"ssh": fleet.wrong_key_settings(impostor)})
    outcome = bench.run("steps: [{name: hello, run: 'echo hi'}]", settings=settings)
    bench.settings = settings
    assert outcome.status is RunStatus.FAILED
    assert outcome.hosts["ghost"] is HostStatus.UNREACHABLE
    assert outcome.hosts[impostor] is HostStatus.UNREACHABLE
    errors = {h["host"]: h["error"] for h in bench.document(outcome.run_id)["hosts"]}
    assert "refused" in errors["ghost"].lower()
    assert "changed" in errors[impostor].lower()
    for name in fleet.names[:-1]:
        assert outcome.hosts[name] is HostStatus.SUCCEEDED


def test_a_hung_command_is_killed_at_its_timeout(bench: Bench) -> None:
    marker = f"mb-hang-{time.time_ns()}"
    started = time.monotonic()
    outcome = bench.run(f"""
        hosts: {bench.fleet.names[0]}
        steps:
          - name: hangs
            run: bash -c "exec -a {marker} sleep 600"
            timeout: 2s
            on_failure: stop
    """)
    assert time.monotonic() - started < 15
    assert outcome.status is RunStatus.FAILED
    step = bench.steps(outcome.run_id, bench.fleet.names[0])[0]
    assert step["status"] == "timed_out", (step["error"], step["stderr_tail"], step["rc"])
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True,
                              check=False)
    assert leftover.stdout == "", "the hung command is gone from the host"


def test_the_breaker_stops_new_hosts_and_aborts_the_run(bench: Bench) -> None:
    outcome = bench.run("""
        concurrency: 1
        max_failures: 0
        steps: [{name: fails, run: 'false'}]
    """)
    assert outcome.status is RunStatus.ABORTED
    assert "circuit breaker" in (outcome.reason or "")
    first, *rest = bench.fleet.names
    assert outcome.hosts[first] is HostStatus.FAILED
    assert all(outcome.hosts[name] is HostStatus.NOT_STARTED for name in rest)


def test_a_failed_canary_batch_stops_the_rollout(bench: Bench) -> None:
    outcome = bench.run("""
        batches: [1, 100%]
        steps: [{name: fails, run: 'false'}]
    """)
    assert outcome.status is RunStatus.ABORTED
    assert "batch 1" in (outcome.reason or "")
    assert list(outcome.hosts.values()).count(HostStatus.NOT_STARTED) == len(bench.fleet.names) - 1


def test_a_failed_check_marked_continue_is_reported_but_stops_no_rollout(bench: Bench) -> None:
    """A stale-backup alert on the canary says nothing about whether the change is safe."""
    outcome = bench.run("""
        batches: [1, 100%]
        max_failures: 0
        steps:
          - {name: alert, run: 'test {{ host.name }} != host-01', on_failure: continue}
          - {name: change, run: 'touch {{ root }}/changed'}
    """)
    assert outcome.status is RunStatus.FAILED, "reported: the run is red, exit 1"
    assert outcome.hosts["host-01"] is HostStatus.FAILED
    assert all(outcome.hosts[name] is HostStatus.SUCCEEDED for name in bench.fleet.names[1:])
    assert all((bench.fleet.root(name) / "changed").exists() for name in bench.fleet.names)


def test_stop_prevents_the_next_step_of_a_running_run(bench: Bench) -> None:
    started = threading.Event()

    def watch(event: Event) -> None:
        if event.step is None and event.status is HostStatus.RUNNING:
            started.set()

    def pull_the_switch() -> None:
        started.wait(10)
        time.sleep(0.3)
        with bench.store() as store:
            store.set_stop("incident 4711", "oncall")

    switch = threading.Thread(target=pull_the_switch)
    switch.start()
    try:
        outcome = bench.run("""
            steps:
              - {name: slow, run: sleep 2}
              - {name: must not run, run: 'touch {{ root }}/after-stop'}
        """, observer=watch)
    finally:
        switch.join()
        with bench.store() as store:
            store.clear_stop("oncall")
    assert outcome.status is RunStatus.ABORTED
    assert "incident 4711" in (outcome.reason or "")
    for name in bench.fleet.names:
        assert not (bench.fleet.root(name) / "after-stop").exists()
        assert bench.statuses(outcome.run_id, name) == ["ok", "skipped"]


def test_dry_run_of_the_example_changes_nothing_and_lists_every_step(bench: Bench) -> None:
    first = bench.fleet.names[0]
    for name in bench.fleet.names:
        (bench.fleet.root(name) / "var/tmp").mkdir(parents=True)
        old = bench.fleet.root(name) / "var/tmp/old.dat"
        old.write_text("x")
        subprocess.run(["touch", "-d", "30 days ago", str(old)], check=True)
    (bench.fleet.root(first) / "var/run").mkdir(parents=True)
    (bench.fleet.root(first) / "var/run/reboot-required").write_text("")
    before = tree_digest(bench.fleet.workdir / "hosts")
    text = (REPO / "runbooks/fleet-health.yaml").read_text().replace(
        "disk_threshold_pct: 80", "disk_threshold_pct: 0")
    outcome = bench.run(text, dry_run=True)
    assert tree_digest(bench.fleet.workdir / "hosts") == before
    doc = bench.document(outcome.run_id)
    assert doc["label"] == "DRY RUN" and doc["dry_run"] is True
    assert outcome.status is RunStatus.SUCCEEDED
    # probes really run (ok); the cleanup's condition is evaluated on their real output
    common = ["ok", "ok", "ok", "would_run", "ok", "would_run"]
    assert bench.statuses(outcome.run_id, first) == [*common, "needs_approval"]
    for other in bench.fleet.names[1:]:
        assert bench.statuses(outcome.run_id, other) == [*common, "skipped"]
    parked = next(s for s in bench.steps(outcome.run_id, first) if s["index"] == 3)
    assert "mv -t" in parked["command"]


def test_dry_run_never_guesses_a_condition_it_cannot_evaluate(bench: Bench) -> None:
    outcome = bench.run("""
        steps:
          - {name: change something, run: 'date > {{ root }}/stamp', register: stamp}
          - {name: depends on it, when: "stamp.rc == 0", run: 'cat {{ root }}/stamp'}
          - {name: independent, run: 'true'}
    """, dry_run=True)
    name = bench.fleet.names[0]
    steps = bench.steps(outcome.run_id, name)
    assert [s["status"] for s in steps] == ["would_run", "unknown", "would_run"]
    assert "stamp" in steps[1]["error"]
    assert not (bench.fleet.root(name) / "stamp").exists()


def test_dry_run_never_guesses_an_action_argument_it_cannot_render(bench: Bench) -> None:
    outcome = bench.run("""
        steps:
          - {name: change something, run: 'date > {{ root }}/stamp', register: stamp}
          - name: reads it in an argument
            action: safe_delete
            with: {within: "{{ root }}", paths: ["{{ root }}/{{ stamp.stdout }}/*"]}
    """, dry_run=True)
    steps = bench.steps(outcome.run_id, bench.fleet.names[0])
    assert [s["status"] for s in steps] == ["would_run", "unknown"]
    assert "stamp" in steps[1]["error"]
