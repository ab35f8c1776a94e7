"""The command line as scripts use it: exit codes, JSON, plain text when piped, crash records."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maintenancebot import views
from maintenancebot.store import RunStore
from maintenancebot.testing.fleet import Fleet

REPO = Path(__file__).resolve().parent.parent


class Cli:
    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.tmp = tmp
        self.fleet = fleet
        self.state = tmp / "state"
        (tmp / "runbooks").mkdir()
        self.inventory = tmp / "inventory.yaml"
        self.inventory.write_text(fleet.inventory_yaml())
        self.config = tmp / "config.yaml"
        self.config.write_text(fleet.config_yaml(self.state, runbooks=tmp / "runbooks",
                                                 inventory=self.inventory))

    def runbook(self, name: str, text: str) -> str:
        (self.tmp / "runbooks" / f"{name}.yaml").write_text(textwrap.dedent(text))
        return name

    def env(self) -> dict[str, str]:
        return {**os.environ, "MAINTENANCEBOT_CONFIG": str(self.config), "NO_COLOR": "1"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "maintenancebot", *args], cwd=REPO,
                              capture_output=True, text=True, env=self.env(), timeout=120,
                              check=False)

    def run_with(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI with extra environment variables (secrets, API keys)."""
        return subprocess.run([sys.executable, "-m", "maintenancebot", *args], cwd=REPO,
                              capture_output=True, text=True, env={**self.env(), **env},
                              timeout=120, check=False)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "maintenancebot", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env())


@pytest.fixture
def cli(fleet: Fleet, tmp_path: Path) -> Cli:
    return Cli(fleet, tmp_path)


def test_the_examples_validate(cli: Cli) -> None:
    result = cli("validate", str(REPO / "runbooks"), str(REPO / "inventory"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_directory_gets_one_located_line_per_mistake_and_exit_2(cli: Cli) -> None:
    result = cli("validate", str(REPO / "tests/fixtures/broken"))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert len(lines) >= 10
    for line in lines:
        file, lineno, rest = line.split(":", 2)
        assert file.endswith((".yaml", ".yml")) and lineno.isdigit() and rest.strip(), line


def test_plan_prints_json_labelled_dry_run_and_exits_0(cli: Cli) -> None:
    cli.runbook("hello", "steps: [{name: greet, run: 'echo hello > {{ root }}/greeting'}]")
    result = cli("plan", "hello", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["label"] == "DRY RUN" and doc["dry_run"] is True
    assert {h["host"] for h in doc["hosts"]} == set(cli.fleet.names)
    assert all(h["label"] == "DRY RUN" for h in doc["hosts"])
    assert {s["status"] for h in doc["hosts"] for s in h["steps"]} == {"would_run"}
    assert not any((cli.fleet.root(n) / "greeting").exists() for n in cli.fleet.names)


def test_piped_dry_run_output_is_plain_and_every_line_says_dry_run(cli: Cli) -> None:
    cli.runbook("hello", "steps: [{name: greet, run: 'echo hello'}]")
    result = cli("run", "hello", "--dry-run", "--hosts", cli.fleet.names[0])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("DRY RUN") for line in lines)
    assert "\x1b[" not in result.stdout
    # Progress goes to stderr, a plain line per finished host.
    assert f"DRY RUN host {cli.fleet.names[0]}: succeeded\n" in result.stderr
    assert "\x1b[" not in result.stderr


def test_piped_messages_keep_one_line_each(cli: Cli) -> None:
    # Under systemd or in CI stderr is a pipe: a wrapped FILE:LINE message would defeat grep.
    cli.runbook("bad", "steps: [{name: one, run: 'true', timeout: %s}]" % ("soon" * 30))
    result = cli("run", "bad")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "steps[0].timeout" in line]
    assert line.startswith(str(cli.tmp / "runbooks" / "bad.yaml") + ":1: ")
    assert line.endswith("(use e.g. 30s, 10m, 2h, 7d)") and len(line) > 150


def test_an_unusable_state_dir_is_one_clear_line_not_a_traceback(cli: Cli) -> None:
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    blocker = cli.tmp / "a-file"
    blocker.write_text("not a directory\n")
    cli.config.write_text(cli.config.read_text().replace(str(cli.state), str(blocker / "state")))
    for args in (("history",), ("run", "fine")):
        result = cli(*args)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            f"error: {blocker}/state/maintenancebot.db: cannot create the run store: Not a "
            "directory (is `state_dir` in the config right, and writable?)")


def test_run_names_the_runbook_line_of_an_unknown_host_and_the_option_of_a_bad_narrowing(
        cli: Cli) -> None:
    cli.runbook("typo", """
        name: typo
        hosts: [all, '!no-such-host']
        steps: [{name: fine, run: 'true'}]
    """)
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    for command in ("plan", "run"):
        typo = cli(command, "typo")
        assert typo.returncode == 2
        assert typo.stderr.splitlines()[0] == (
            f"{cli.tmp / 'runbooks' / 'typo.yaml'}:3: hosts[1]: unknown host or group "
            "'no-such-host'")
    narrowed = cli("run", "fine", "--hosts", "no-such-host")
    assert narrowed.returncode == 2
    assert narrowed.stderr.strip() == "error: --hosts: unknown host or group: no-such-host"


def test_metrics_into_a_missing_directory_is_one_line_and_leaves_nothing(cli: Cli) -> None:
    target = cli.tmp / "no-collector" / "maintenancebot.prom"
    result = cli("metrics", "--textfile", str(target))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot write {target}: No such file or directory"
    assert not target.parent.exists()
    # Nothing recorded is said as such, on stderr, so a pipe still reads an empty list.
    fires = cli("fires")
    assert (fires.returncode, fires.stdout) == (0, "")
    assert "no scheduled fires recorded yet" in fires.stderr


def test_a_secret_by_var_must_be_a_reference_and_is_then_redacted_everywhere(cli: Cli) -> None:
    cli.runbook("echo", "steps: [{name: say, run: 'echo {{ api_token }}', readonly: true}]")
    inline = cli("run", "echo", "--var", "api_token=tok-Inl1ne-92xq")
    assert inline.returncode == 2
    assert "api_token: write secrets as env:NAME or file:/path, never inline" in inline.stderr
    assert json.loads(cli("history", "--json").stdout) == [], "nothing ran"
    secret = "tok-Pl4nted-Var-58zk"
    ran = cli.run_with({"MB_PLANTED_VAR": secret}, "run", "echo", "--var",
                       "api_token=env:MB_PLANTED_VAR", "--json")
    assert ran.returncode == 0, ran.stderr
    step = json.loads(ran.stdout)["hosts"][0]["steps"][0]
    assert step["command"] == "echo '[REDACTED]'"
    written = b"".join(p.read_bytes() for p in cli.state.rglob("*") if p.is_file())
    assert b"[REDACTED]" in written and secret.encode() not in written  # nor its echo


def test_a_dry_run_shows_the_rollout_a_runbook_change_would_make(cli: Cli) -> None:
    first, *rest = cli.fleet.names
    marker = cli.tmp / "checked"
    cli.runbook("rolling", f"""
        batches: [1, 100%]
        max_failures: 0
        between_batches: touch {marker}
        steps: [{{name: fine, run: 'true'}}]
    """)
    plan = cli("plan", "rolling")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[1:4] == [
        f"DRY RUN rollout: batch 1: {first}; batch 2: {', '.join(rest)} (up to 10 hosts at once)",
        "DRY RUN circuit breaker: no new host starts once any host failed",
        f"DRY RUN between batches, on this controller (not in a dry-run): touch {marker}",
    ]
    assert not marker.exists()
    rollout = json.loads(cli("plan", "rolling", "--json").stdout)["rollout"]
    assert rollout == {"batches": [[first], rest], "concurrency": 10, "max_failures": 0,
                       "between_batches": f"touch {marker}"}


def test_rollout_lines_read_as_sentences_for_one_host_and_any_breaker() -> None:
    one = {"batches": [["web-1"]], "concurrency": 5, "max_failures": 1, "between_batches": None}
    assert views.rollout_lines(one) == [
        "rollout: 1 host", "circuit breaker: no new host starts once more than 1 host failed"]
    many = {**one, "batches": [["a", "b", "c"]], "max_failures": 2}
    assert views.rollout_lines(many) == [
        "rollout: all 3 hosts in one batch, up to 5 at once",
        "circuit breaker: no new host starts once more than 2 hosts failed"]


def test_run_exit_codes_tell_failures_from_aborts(cli: Cli) -> None:
    cli.runbook("fails", "steps: [{name: nope, run: 'false'}]")
    cli.runbook("breaks", "{max_failures: 0, concurrency: 1, steps: [{name: nope, run: 'false'}]}")
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    assert cli("run", "fine").returncode == 0
    assert cli("run", "fails").returncode == 1
    assert cli("run", "breaks").returncode == 3
    assert cli("run", "missing-runbook").returncode == 2
    assert cli("run", "fine", "--hosts", "no-such-host").returncode == 2


def test_history_and_show_read_back_a_run(cli: Cli) -> None:
    nothing = cli("show", "latest")
    assert (nothing.returncode, nothing.stderr.strip()) == (2, "error: no run recorded yet")
    cli.runbook("fine", "steps: [{name: fine, run: 'echo ok'}]")
    run = json.loads(cli("run", "fine", "--json").stdout)
    history = json.loads(cli("history", "--json").stdout)
    assert history[0]["run_id"] == run["run_id"] and history[0]["status"] == "succeeded"
    shown = json.loads(cli("show", run["run_id"][:15], "--json").stdout)
    assert shown["hosts"] == run["hosts"]
    dry = json.loads(cli("plan", "fine", "--json").stdout)
    assert json.loads(cli("show", "latest", "--json").stdout)["run_id"] == dry["run_id"]
    cli.runbook("nope", "steps: [{name: nope, run: 'false'}]")
    failed = json.loads(cli("run", "nope", "--json").stdout)
    by_runbook = json.loads(cli("history", "--runbook", "fine", "--json").stdout)
    assert [e["run_id"] for e in by_runbook] == [dry["run_id"], run["run_id"]]
    by_status = json.loads(cli("history", "--status", "failed", "--json").stdout)
    assert [e["run_id"] for e in by_status] == [failed["run_id"]]
    assert cli("history", "--status", "bogus").returncode == 2
    for command in (["history"], ["trash", "list"], ["fires"]):  # SQLite reads -1 as "all"
        refused = cli(*command, "--limit", "-1")
        assert refused.returncode == 2 and "--limit" in refused.stderr, command


def test_stop_refuses_new_runs_until_resume(cli: Cli) -> None:
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    assert cli("stop", "--reason", "change freeze").returncode == 0
    logins = {name: cli.fleet.logins(name) for name in cli.fleet.names}
    stopped = cli("run", "fine", "--json")
    assert stopped.returncode == 3
    assert "change freeze" in json.loads(stopped.stdout)["reason"]
    # Not even a connection: during a freeze no host's auth log shows the bot.
    assert {name: cli.fleet.logins(name) for name in cli.fleet.names} == logins
    assert cli("resume").returncode == 0
    assert cli("run", "fine").returncode == 0


def test_a_run_whose_hosts_are_in_another_run_contacts_no_host(cli: Cli) -> None:
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    held = cli.fleet.names[1]
    with RunStore(cli.state / "maintenancebot.db") as store:  # a live run elsewhere holds one
        assert store.acquire_hosts([held], "run other", "other") == {}
        logins = {name: cli.fleet.logins(name) for name in cli.fleet.names}
        refused = cli("run", "fine")
        assert refused.returncode == 3  # aborted, as under the kill switch: try again later
        assert f"{held} (held by run other)" in refused.stderr
        assert {name: cli.fleet.logins(name) for name in cli.fleet.names} == logins
        # A dry-run only reads: it takes no lease, and goes ahead.
        assert cli("plan", "fine").returncode == 0
        store.release_hosts("run other")
    assert cli("run", "fine").returncode == 0


def _until_step_runs(cli: Cli, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (cli.state / "maintenancebot.db").exists():
            with RunStore(cli.state / "maintenancebot.db") as store:
                runs = store.list_runs()
                if runs and any(s.name == name and s.status == "running"
                                for s in store.get_steps(runs[0].id)):
                    return
        time.sleep(0.1)
    raise AssertionError(f"step {name!r} never ran")


def test_sigterm_stops_a_run_between_steps_and_a_second_one_at_once(cli: Cli) -> None:
    # CI cancelling a job, `timeout` or systemd stopping a unit send SIGTERM, not Ctrl-C.
    cli.runbook("slow", """
        steps:
          - {name: long one, run: sleep 3}
          - {name: after, run: 'true'}
    """)
    process = cli.spawn("run", "slow", "--hosts", cli.fleet.names[0])
    _until_step_runs(cli, "long one")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 3, stderr
    latest = json.loads(cli("history", "--json").stdout)[0]
    assert latest["status"] == "interrupted"
    assert latest["note"].startswith("stopped by SIGTERM: the steps in flight finished")
    steps = {s["name"]: s["status"] for s in json.loads(cli("show", latest["run_id"], "--json")
                                                         .stdout)["hosts"][0]["steps"]}
    assert steps == {"long one": "ok", "after": "skipped"}, "the step in flight finished"

    process = cli.spawn("run", "slow", "--hosts", cli.fleet.names[0])
    _until_step_runs(cli, "long one")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    assert process.returncode == -signal.SIGTERM and time.monotonic() - started < 2.5


def test_kill_9_mid_run_leaves_an_interrupted_run_naming_the_step_in_flight(cli: Cli) -> None:
    cli.runbook("slow", """
        steps:
          - {name: quick, run: 'true'}
          - {name: long one, run: sleep 30}
    """)
    process = cli.spawn("run", "slow", "--hosts", cli.fleet.names[0])
    _until_step_runs(cli, "long one")
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    result = cli("history", "--json")
    assert result.returncode == 0, result.stderr
    latest = json.loads(result.stdout)[0]
    assert latest["status"] == "interrupted"
    assert "long one" in latest["note"]
    plain = cli("history")
    assert "interrupted" in plain.stdout and "long one" in plain.stdout


def test_var_overrides_runbook_and_inventory_vars_for_one_run(cli: Cli) -> None:
    cli.runbook("greet", """
        vars: {greeting: hello, loud: false}
        steps:
          - {name: greet, run: 'echo {{ greeting }} > {{ root }}/greeting', when: 'not loud'}
    """)
    first = cli.fleet.names[0]
    assert cli("run", "greet", "--hosts", first, "--var", "greeting=good day",
               "--var", "loud=false").returncode == 0
    assert (cli.fleet.root(first) / "greeting").read_text() == "good day\n"
    skipped = json.loads(cli("run", "greet", "--hosts", first, "--var", "loud=true",
                             "--json").stdout)
    step = skipped["hosts"][0]["steps"][0]
    # Printed after "skipped", the reason must not read as the condition for skipping.
    assert (step["status"], step["error"]) == ("skipped", "condition false: not loud")
    bad = cli("run", "greet", "--var", "no equals sign")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    reserved = cli("run", "greet", "--var", "host=web-01")
    assert reserved.returncode == 2 and "'host' is a name every template already has" in \
        reserved.stderr
    # A version pin is text: JSON would make 1.10 the number 1.1, and 007 is not JSON at all.
    for given in ("1.10", "007", "1e3", "NaN", " 3"):
        assert cli("run", "greet", "--hosts", first, "--var", f"greeting={given}").returncode == 0
        assert (cli.fleet.root(first) / "greeting").read_text() == f"{given}\n"


def test_a_piped_run_never_loads_rich(cli: Cli) -> None:
    cli.runbook("hello", "steps: [{name: greet, run: 'echo hello'}]")
    env = {k: v for k, v in cli.env().items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "maintenancebot", "run",
                             "hello", "--hosts", cli.fleet.names[0]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "maintenancebot.engine" in imported
    assert not [name for name in imported if name.split(".")[0] == "rich"]


def test_a_run_on_a_terminal_draws_its_table(cli: Cli) -> None:
    cli.runbook("hello", "steps: [{name: greet, run: 'echo hello'}]")
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "maintenancebot", "run", "hello", "--hosts",
                           cli.fleet.names[0]], cwd=REPO, env={**cli.env(), "COLUMNS": "120"},
                          stdin=subprocess.DEVNULL, stdout=follower, stderr=follower) as child:
        os.close(follower)
        screen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert child.wait(120) == 0, screen.decode(errors="replace")
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "┃ host" in text and f"│ {cli.fleet.names[0]}" in text
    assert "status: succeeded" in text


def test_loading_pauses_the_collector_and_freezes_what_it_loaded() -> None:
    import gc

    from maintenancebot.cli_run import _loading

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with _loading():
        assert not gc.isenabled()
        loaded = [[] for _ in range(100)]
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(loaded)
    with pytest.raises(RuntimeError), _loading():  # a failed load must not leave it off
        raise RuntimeError("bad runbook")
    assert gc.isenabled()
    gc.disable()
    try:
        with _loading():
            pass
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()


def test_a_host_that_cannot_be_reached_is_reported_and_the_others_run(cli: Cli) -> None:
    # The CLI dials the first hosts while the run sets up: a failed dial is the host's result.
    cli.inventory.write_text(cli.fleet.inventory_yaml()
                             + '  ghost: {address: "127.0.0.1", port: 9}\n')
    cli.runbook("fine", "steps: [{name: fine, run: 'true'}]")
    done = cli("run", "fine", "--json")
    assert done.returncode == 1, done.stderr
    hosts = {host["host"]: host for host in json.loads(done.stdout)["hosts"]}
    ghost = hosts.pop("ghost")
    assert ghost["status"] == "unreachable" and "refused" in ghost["error"]
    assert {host["status"] for host in hosts.values()} == {"succeeded"}


def test_every_command_has_its_whole_one_line_help_in_an_80_column_terminal(cli: Cli) -> None:
    for group in ([], ["trash"]):
        shown = subprocess.run([sys.executable, "-m", "maintenancebot", *group, "--help"],
                               capture_output=True, text=True, check=True, cwd=REPO,
                               env={**cli.env(), "COLUMNS": "80"}).stdout
        commands = shown.split("Commands:\n", 1)[1].splitlines()
        assert commands and not [line for line in commands if line.endswith("...")], shown
