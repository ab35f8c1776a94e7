"""The transport contract, run against the local transport and real sshd (testinfra-style).
What only SSH has is in test_transport_ssh.py.

Fleet hosts live on this machine, so a test's tmp_path is a valid path on them too, and `pgrep`
here sees the processes a command started over SSH.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maintenancebot.errors import CommandTimeout, TransportError
from maintenancebot.models import Host
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports.base import (
    KILL_GRACE,
    Command,
    OutputTail,
    Transport,
    controller_deadline,
    wrap_script,
)
from maintenancebot.transports.local import LocalTransport
from maintenancebot.transports.ssh import SshTransport

# Prints the pid of the sshd process serving this session: the same pid means the same connection.
SSHD_OF_SESSION = """p=$$
while [ "$p" -gt 1 ]; do
  case "$(cat /proc/$p/comm)" in sshd*) echo "$p"; exit 0;; esac
  p=$(awk '/^PPid:/ {print $2}' /proc/$p/status)
done
exit 1"""


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pids_of(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def running(pattern: str) -> bool:
    return bool(pids_of(pattern))


def unique_sleep() -> str:
    """A `sleep` argument nobody else uses, so pgrep finds exactly this test's processes."""
    return f"600.{secrets.randbelow(10**9):09d}"


# ------------------------------------------------------------------------------ the contract


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.sshd)])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    opened: Transport
    if request.param == "local":
        opened = LocalTransport(Host(name="local", address="localhost", connection="local"))
    else:
        fleet: Fleet = request.getfixturevalue("fleet")
        opened = SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings)
    opened.connect()
    yield opened
    opened.close()


# With a timeout, as every step has, an SSH command runs in the connection's shell; without, on
# a channel of its own (`ssh_shell`). The contract is the same.
WITH_AND_WITHOUT_TIMEOUT = pytest.mark.parametrize("timeout", [None, 30])


@WITH_AND_WITHOUT_TIMEOUT
def test_run_returns_rc_stdout_and_stderr(transport: Transport, timeout: float | None) -> None:
    result = transport.run(Command("echo out; echo err >&2; exit 3", timeout=timeout))
    assert (result.rc, result.stdout, result.stderr, result.ok) == (3, "out\n", "err\n", False)
    assert 0 <= result.duration < 5


def test_stdin_is_written_and_closed(transport: Transport) -> None:
    assert transport.run(Command("cat; echo end", stdin=b"line\n")).stdout == "line\nend\n"
    # No stdin means an immediate EOF, not a command waiting forever for input.
    assert transport.run(Command("cat; echo end", timeout=10)).stdout == "end\n"


def test_binary_stdin_arrives_byte_for_byte(transport: Transport) -> None:
    data = os.urandom(1_000_000)
    result = transport.run(Command("sha256sum", stdin=data))
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_large_stdin_echoed_back_does_not_deadlock(transport: Transport) -> None:
    # Far beyond pipe buffers and SSH windows in both directions at once.
    data = b"0123456789abcdef" * 250_000
    result = transport.run(Command("cat", stdin=data, timeout=60))
    assert result.stdout.encode() == data


def test_megabytes_on_both_streams_do_not_deadlock(transport: Transport) -> None:
    script = ("(head -c 3000000 /dev/zero | tr '\\0' e >&2) &"
              " head -c 4000000 /dev/zero | tr '\\0' o; wait")
    result = transport.run(Command(script, timeout=60))
    assert (len(result.stdout), set(result.stdout)) == (4_000_000, {"o"})
    assert (len(result.stderr), set(result.stderr)) == (3_000_000, {"e"})


def test_an_output_limit_keeps_each_stream_s_end_and_says_how_much_went(
        transport: Transport) -> None:
    # 3 MB of numbered lines on stdout, 2 MB on stderr, at once: only the last 1000 bytes stay.
    script = ("(seq 1 300000 | sed 's/^/e/' >&2) & seq 1 400000; wait")
    result = transport.run(Command(script, timeout=60, output_limit=1000))
    for text, prefix, last in ((result.stdout, "", 400000), (result.stderr, "e", 300000)):
        head, kept = text.split("\n", 1)
        assert len(kept.encode()) == 1000 and kept.endswith(f"\n{prefix}{last}\n")
        full = sum(len(f"{prefix}{n}\n") for n in range(1, last + 1))
        assert head == (f"[maintenancebot: {full - 1000} bytes of output dropped; the last 1000 "
                        "follow]")
    small = transport.run(Command("echo hello", output_limit=1000))
    assert small.stdout == "hello\n", "what fits is kept whole, without a note"


def test_a_flood_of_output_costs_only_the_kept_tail_of_memory() -> None:
    # In a process of its own, so that its peak RSS is the transport's: 1 GB printed, 4 MiB kept.
    # (The peak is 40-160 MB with malloc's churn under load; reading it all would be > 1 GB.)
    probe = textwrap.dedent("""
        import resource
        from maintenancebot.models import Host
        from maintenancebot.transports.base import Command
        from maintenancebot.transports.local import LocalTransport
        local = LocalTransport(Host(name="l", address="localhost", connection="local"))
        flood = "head -c 1000000000 /dev/zero | tr '\\\\0' a"
        result = local.run(Command(flood, timeout=120, output_limit=4 << 20))
        print(len(result.stdout), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    kept, peak_mb = map(int, done.stdout.split())
    assert 4 << 20 < kept < (4 << 20) + 100
    assert peak_mb < 400, f"peak RSS {peak_mb} MB for a 4 MiB tail"


def test_output_tail_keeps_exactly_the_last_bytes_of_any_chunking() -> None:
    rng = random.Random(5)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
        limit = rng.choice([None, 0, 1, 7, 64, 1000])
        tail = OutputTail(limit)
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randrange(1, 6))))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            tail.add(data[start:end])
        kept = data if limit is None else data[len(data) - min(limit, len(data)):]
        dropped = len(data) - len(kept)
        note = (f"[maintenancebot: {dropped} bytes of output dropped; the last {len(kept)} "
                "follow]\n").encode() if dropped else b""
        assert tail.value() == note + kept


@WITH_AND_WITHOUT_TIMEOUT
def test_output_that_is_not_utf8_is_replaced_not_fatal(
        transport: Transport, timeout: float | None) -> None:
    result = transport.run(Command("printf 'ok \\377\\376 end'; printf '\\377' >&2",
                                   timeout=timeout))
    assert (result.stdout, result.stderr) == ("ok \ufffd\ufffd end", "\ufffd")


@WITH_AND_WITHOUT_TIMEOUT
def test_env_values_arrive_verbatim(transport: Transport, timeout: float | None) -> None:
    value = "it's \"quoted\" $HOME `id` ; rm -rf /nothing\nand a second line"
    result = transport.run(Command('printf %s "$GREETING"', env={"GREETING": value},
                                   timeout=timeout))
    assert result.stdout == value


@pytest.mark.parametrize("script", [
    "uname -s", "id -u", "ls -d / /nonexistent", "df -P --output=target /", "env",
    "printenv HOME",
    "no-such-program-here --flag", "/etc/hostname", "dd if=/dev/null of=/dev/null count=0",
    "/bin/echo 'a  b' \"c *\" -n='x y'z ''", "find /etc -maxdepth 0 -name 'e*'",
])
def test_a_plain_command_runs_as_it_would_through_sh(transport: Transport, script: str) -> None:
    # A trailing newline makes the same script not plain: the reference run goes through sh.
    direct = transport.run(Command(script, timeout=30))
    through_sh = transport.run(Command(script + "\n", timeout=30))
    # sorted: sh passes the environment on in another order (`env`, `printenv`)
    assert (direct.rc, sorted(direct.stdout.splitlines())) == \
        (through_sh.rc, sorted(through_sh.stdout.splitlines()))
    assert bool(direct.stderr) == bool(through_sh.stderr)


@pytest.mark.parametrize(("script", "plain"), [
    ("uptime", True), ("systemctl restart nginx.service", True), ("df -P /", True),
    ("dd if=/dev/zero of=/tmp/x count=1", True), ("git -C /srv/app pull", True),
    ("test -d /srv", False), ("echo -e hi", False), ("cd /tmp", False), ("exit 3", False),
    ("true", False), ("FOO=1 env", False), ("-v", False), ("ls ~", False), ("ls *.log", False),
    ("echo $HOME", False), ("a | b", False), ("a; b", False), ("a && b", False),
    ("a > f", False), ("a 'b c'", True), ("a\nb", False), ("uptime\n", False),
    ("ls\t-l", False), ("cat `x`", False), ("ls {a,b}", False), ("ls #x", False),
    ("if", False), ("! x", False), ("ls [ab]", False), ("x &", False), ("ls %1", False),
    ("find /var/log -name '*.log' -mtime +7", True), ('grep -c "a b" /etc/hosts', True),
    ('echo "$HOME"', False), ('ls "$(x)"', False), ('ls "`x`"', False), ('ls "a\\b"', False),
    ("'uptime'", False), ("ls 'a\nb'", False), ("ls 'a", False), ('ls "a', False),
])
def test_only_a_plain_command_skips_the_shell(script: str, plain: bool) -> None:
    line = wrap_script(Command(script, timeout=5))
    assert ("sh -c" not in line) == plain, line
    if plain:
        assert shlex.split(line) == ["timeout", "-k", str(KILL_GRACE), "5", *shlex.split(script)]


def test_a_plain_command_has_the_words_sh_would_give_it() -> None:
    # Random scripts from the plain grammar's pieces (quotes with spaces, quote characters and
    # shell syntax inside them, empty quotes, pieces glued into one word): each plain one must
    # split as POSIX quote removal (shlex.split) splits it.
    rnd = random.Random(8)
    pieces = ["a", "Z", "9", "_", ".", "/", ",", ":", "+", "@", "=", "-", "'x y'", "''", '""',
              '"a b"', "'\"'", "\"'\"", "'$HOME'", "'*;|'", '"*"', "é", "\\", "$"]
    checked = 0
    for _ in range(20000):
        words = ["".join(rnd.choices(pieces, k=rnd.randint(1, 4)))
                 for _ in range(rnd.randint(1, 4))]
        script = (" " * rnd.randint(1, 2)).join(words)
        line = wrap_script(Command(script, timeout=5))
        if "sh -c" not in line:
            checked += 1
            assert shlex.split(line)[4:] == shlex.split(script), script
    assert checked > 1000  # the generator does reach the plain grammar


@WITH_AND_WITHOUT_TIMEOUT
def test_a_command_starts_only_once_before_start_has_returned(
        transport: Transport, tmp_path: Path, timeout: float | None) -> None:
    ran, never = tmp_path / "ran", tmp_path / "never"
    seen: list[bool] = []

    def before() -> None:  # as the engine waits here for the step's record to reach the disk
        time.sleep(0.3)
        seen.append(ran.exists())

    transport.run(Command(f"touch {ran}", timeout=timeout), before_start=before)
    assert seen == [False] and ran.exists()

    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused

    with pytest.raises(Refused):
        transport.run(Command(f"touch {never}", timeout=timeout), before_start=refuse)
    time.sleep(0.3)
    assert not never.exists()
    assert transport.run(Command("echo still usable", timeout=timeout)).stdout == \
        "still usable\n"


def test_death_by_signal_reports_128_plus_the_signal(transport: Transport) -> None:
    assert transport.run(Command("kill -KILL $$")).rc == 137
    # Under the host's `timeout` too, and not mistaken for a timeout.
    assert transport.run(Command("kill -TERM $$", timeout=30)).rc == 143
    assert transport.run(Command("kill -KILL $$", timeout=30)).rc == 137


def test_timeout_kills_the_command_and_everything_it_started(transport: Transport) -> None:
    marker = unique_sleep()
    with pytest.raises(CommandTimeout) as caught:
        transport.run(Command(f"echo started; sleep {marker}; echo never", timeout=2))
    assert 2 <= caught.value.duration < 2 + KILL_GRACE
    assert caught.value.stdout == "started\n"
    assert wait_until(lambda: not running(marker), 3), "the sleep outlived its timeout"


def test_a_command_ignoring_sigterm_is_killed_after_the_grace(transport: Transport) -> None:
    marker = unique_sleep()
    command = Command(f"trap '' TERM; sleep {marker}", timeout=1)
    with pytest.raises(CommandTimeout) as caught:
        transport.run(command)
    # Killed by the host's `timeout` (SIGKILL after the grace), before the controller gives up.
    assert 1 + KILL_GRACE <= caught.value.duration < (controller_deadline(command) or 0)
    assert wait_until(lambda: not running(marker), 3)


def test_a_command_escaping_its_timeout_is_abandoned_at_the_controller_deadline(
    transport: Transport,
) -> None:
    # `setsid` leaves the group that `timeout` kills, yet holds stdout open: only the
    # controller's own deadline can end this wait.
    marker = unique_sleep()
    command = Command(f"echo started; setsid sleep {marker} &", timeout=1)
    deadline = controller_deadline(command) or 0
    try:
        with pytest.raises(CommandTimeout, match="still running") as caught:
            transport.run(command)
        assert caught.value.stdout == "started\n"
        assert deadline <= caught.value.duration < deadline + 2
    finally:
        for pid in pids_of(marker):
            os.kill(pid, signal.SIGKILL)


def test_sudo_runs_as_root(transport: Transport) -> None:
    result = transport.run(Command("id -u", sudo=True, timeout=30))
    assert (result.rc, result.stdout) == (0, "0\n"), result.stderr


def test_put_then_get_round_trips_bytes_and_mode(transport: Transport, tmp_path: Path) -> None:
    path = str(tmp_path / "blob")
    data = bytes(range(256)) * 1000
    transport.put(data, path, mode=0o640)
    assert transport.get(path) == data
    assert transport.run(Command(f"stat -c %a {path}")).stdout == "640\n"


def test_put_replaces_a_file_and_leaves_no_temporary(transport: Transport, tmp_path: Path) -> None:
    path = str(tmp_path / "config")
    transport.put(b"old", path)
    transport.put(b"new", path)
    assert transport.get(path) == b"new"
    assert os.listdir(tmp_path) == ["config"]


def test_file_errors_are_transport_errors(transport: Transport, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot read"):
        transport.get(str(tmp_path / "missing"))
    with pytest.raises(TransportError, match="cannot write"):
        transport.put(b"x", str(tmp_path / "no-such-dir" / "file"))


def test_connect_and_close_are_idempotent(transport: Transport) -> None:
    transport.connect()
    transport.close()
    transport.close()
    # Every operation connects on demand, so a closed transport is usable again.
    assert transport.run(Command("echo again")).stdout == "again\n"
