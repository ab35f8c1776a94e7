"""What only the SSH transport has: one connection shared by many runs, host keys, unreachable
and lost hosts, jump hosts, ciphers, output collected as it arrives. The contract both
transports keep is in test_transports.py, whose helpers these tests share."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maintenancebot.errors import ConnectError, HostKeyError, TransportError
from maintenancebot.inventory import resolve_inventory
from maintenancebot.loader import load_inventory, load_settings
from maintenancebot.models import Host, SshSettings
from maintenancebot.testing.fleet import Fleet, FleetError
from maintenancebot.transports import ssh_output
from maintenancebot.transports.base import Command
from maintenancebot.transports.ssh import SshTransport
from tests.test_transports import SSHD_OF_SESSION, running, unique_sleep, wait_until


def test_many_runs_share_one_connection(fleet: Fleet, tmp_path: Path) -> None:
    host = fleet.host(fleet.names[1])
    logins = fleet.logins(host.name)
    with SshTransport(host, fleet.ssh_settings) as ssh:
        sessions = {ssh.run(Command(SSHD_OF_SESSION)).stdout for _ in range(20)}
        ssh.put(b"x", str(tmp_path / "f"))  # SFTP rides on the same connection
        assert ssh.get(str(tmp_path / "f")) == b"x"
        ssh.connect()
        assert fleet.connections(host.name) == 1
    assert len(sessions) == 1 and sessions != {""}
    assert fleet.logins(host.name) - logins == 1
    assert wait_until(lambda: fleet.connections(host.name) == 0), "close() left it open"


def test_output_is_collected_as_it_arrives_not_by_periodic_polling(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the periodic wake-up an hour away, only the streams' own events (data, EOF) can end
    # a wait before the command's deadline; a missed one would show as a wait that timed out.
    monkeypatch.setattr(ssh_output, "POLL_SECONDS", 3600.0)
    woken: list[bool] = []
    wait = ssh_output.Arrivals.wait
    monkeypatch.setattr(ssh_output.Arrivals, "wait",
                        lambda self, seconds: woken.append(wait(self, seconds)) or woken[-1])
    scripts = {"echo out": ("out\n", ""), "echo err >&2": ("", "err\n"), "true": ("", ""),
               "sleep 0.3; echo late": ("late\n", ""),
               "head -c 300000 /dev/zero | tr '\\0' o; echo e >&2": ("o" * 300_000, "e\n")}
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        for script, (out, err) in scripts.items():
            result = ssh.run(Command(script, timeout=5))
            assert (result.rc, result.stdout, result.stderr) == (0, out, err), script
            assert all(woken), f"{script}: a wait ran out before its data came"
    assert woken  # `sleep 0.3` at least had to wait


def test_unreachable_host_fails_fast_with_connect_error(fleet: Fleet) -> None:
    name = fleet.names[2]
    fleet.stop_host(name)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectError, match="refused"):
            SshTransport(fleet.host(name), fleet.ssh_settings).connect()
        assert time.monotonic() - started < 1
    finally:
        fleet.start_host(name)


def test_connection_lost_during_a_command_is_a_transport_error(fleet: Fleet) -> None:
    name, marker = fleet.names[2], unique_sleep()
    errors: list[BaseException] = []

    def sleep_remotely() -> None:
        with SshTransport(fleet.host(name), fleet.ssh_settings) as ssh:
            try:
                ssh.run(Command(f"sleep {marker}"))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

    worker = threading.Thread(target=sleep_remotely)
    worker.start()
    try:
        assert wait_until(lambda: running(marker))
        fleet.stop_host(name)
        worker.join(10)
    finally:
        fleet.start_host(name)
    assert not worker.is_alive()
    assert len(errors) == 1 and type(errors[0]) is TransportError, errors


def test_a_silent_server_times_out_at_connect_timeout(fleet: Fleet) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never says a word
        host = Host(name="silent", address="127.0.0.1", port=silent.getsockname()[1])
        settings = fleet.ssh_settings.model_copy(update={"connect_timeout": 1.0})
        started = time.monotonic()
        with pytest.raises(ConnectError, match="no SSH handshake within 1s"):
            SshTransport(host, settings).connect()
        assert time.monotonic() - started < 3


def test_unknown_host_key_is_rejected_with_the_fix(fleet: Fleet) -> None:
    name = fleet.names[0]
    host = fleet.host(name)
    with pytest.raises(HostKeyError, match="is not in .*ssh-keyscan -p") as caught:
        SshTransport(host, fleet.unknown_key_settings(name)).connect()
    assert f"{host.address}:{host.port}" in str(caught.value)


def test_changed_host_key_is_rejected_as_possible_attack(fleet: Fleet) -> None:
    name = fleet.names[0]
    with pytest.raises(HostKeyError, match="CHANGED.*man-in-the-middle"):
        SshTransport(fleet.host(name), fleet.wrong_key_settings(name)).connect()


@pytest.mark.parametrize("form", ["hashed", "wildcard", "name list", "negated", "mixed case"])
def test_known_hosts_lines_match_as_in_openssh(fleet: Fleet, tmp_path: Path, form: str) -> None:
    """Each way OpenSSH lets a known_hosts line name a host; a negated name never matches."""
    import paramiko  # only to hash a name the way `ssh-keygen -H` does

    name = fleet.names[0]
    host = fleet.host(name)
    entry = f"[{host.address}]:{host.port}"
    key = next(line.split(None, 1)[1] for line in fleet.known_hosts.read_text().splitlines()
               if line.startswith(entry + " "))
    patterns = {
        "hashed": paramiko.HostKeys.hash_host(entry),
        "wildcard": f"[{host.address.rsplit('.', 1)[0]}.*]:{host.port}",
        "name list": f"other.example,{entry},[127.0.0.250]:22",
        "negated": f"[127.0.0.*]:*,!{entry}",
        "mixed case": f"OTHER.example,{entry.upper()}",
    }[form]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"# a comment\n@revoked * {key}\n|1|not-base64|?? {key}\n"
                           f"{patterns} {key}\n")
    settings = fleet.ssh_settings.model_copy(update={"known_hosts": str(known_hosts)})
    if form == "negated":
        with pytest.raises(HostKeyError, match="is not in"):
            SshTransport(host, settings).connect()
        return
    with SshTransport(host, settings) as ssh:
        assert ssh.run(Command("echo matched")).stdout == "matched\n"


@pytest.mark.parametrize("server_ciphers", [None, "aes256-ctr,aes128-cbc"])
def test_an_aead_cipher_is_chosen_where_offered_and_others_still_connect(
        tmp_path: Path, server_ciphers: str | None) -> None:
    options = ["LogLevel DEBUG1"] + ([f"Ciphers {server_ciphers}"] if server_ciphers else [])
    with Fleet(tmp_path, 1, sshd_options=options) as own:
        name = own.names[0]
        with SshTransport(own.host(name), own.ssh_settings) as ssh:
            assert ssh.run(Command("echo up")).stdout == "up\n"
        chosen = re.search(r"kex: client->server cipher: (\S+)", own.sshd_log(name))
    assert chosen is not None
    assert chosen.group(1) == ("aes128-gcm@openssh.com" if server_ciphers is None else "aes256-ctr")


def test_the_steps_of_a_connection_run_in_one_shell_on_the_host(fleet: Fleet) -> None:
    """sshd starts no session per step: each step is a child of `timeout`, whose parent is the
    connection's one shell. A command without a timeout still takes a channel of its own, whose
    login shell execs it: its parent is sshd."""
    parents = ('p=$PPID; for _ in 1 2; do echo "$(cat /proc/$p/comm):$p"; '
               'p=$(awk \'/^PPid:/ {print $2}\' /proc/$p/status); done')
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        first = ssh.run(Command(parents, timeout=30)).stdout.split()
        second = ssh.run(Command(parents, timeout=30)).stdout.split()
        assert [entry.split(":")[0] for entry in first] == ["timeout", "sh"]
        assert first[1] == second[1]
        assert first[0] != second[0]
        assert ssh.run(Command(parents)).stdout.split()[0].startswith("sshd:")


def test_no_known_hosts_file_means_no_connection(fleet: Fleet) -> None:
    settings = SshSettings(identity_file=str(fleet.client_key))
    with pytest.raises(HostKeyError, match="no known_hosts file is configured"):
        SshTransport(fleet.host(fleet.names[0]), settings).connect()


def test_a_key_the_host_does_not_know_fails_authentication(fleet: Fleet, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    host = fleet.host(fleet.names[0]).model_copy(update={"identity_file": str(stranger)})
    with pytest.raises(ConnectError) as refused:
        SshTransport(host, fleet.ssh_settings).connect()
    assert str(refused.value).endswith(
        ": authentication failed; is our public key in the host's authorized_keys?")


def test_jump_host_carries_the_connection_and_both_close(fleet: Fleet) -> None:
    jump, target = fleet.names[1], fleet.names[2]
    ssh = SshTransport(fleet.host(target, via=jump), fleet.ssh_settings)
    logins = {name: fleet.logins(name) for name in (jump, target)}
    try:
        result = ssh.run(Command("echo $SSH_CONNECTION"))
        target_host = fleet.host(target)
        assert result.stdout.split()[2:] == [target_host.address, str(target_host.port)]
        assert {name: fleet.logins(name) - logins[name] for name in logins} == {jump: 1, target: 1}
        ssh.close()
        assert wait_until(lambda: fleet.connections(jump) + fleet.connections(target) == 0)
        # The target is reached only through the jump host: without it, the connection dies.
        ssh.connect()
        fleet.stop_host(jump)
        with pytest.raises(TransportError):
            ssh.run(Command("true", timeout=5))
    finally:
        ssh.close()
        fleet.start_host(jump)


def test_jump_host_keys_are_verified_too(fleet: Fleet) -> None:
    jump, target = fleet.names[1], fleet.names[2]
    with pytest.raises(HostKeyError, match=f"{fleet.host(jump).address}:.* is not in"):
        SshTransport(fleet.host(target, via=jump), fleet.unknown_key_settings(jump)).connect()


def test_transports_in_parallel_threads_keep_their_output_apart(fleet: Fleet) -> None:
    def work(job: tuple[str, int]) -> list[str]:
        name, worker = job
        with SshTransport(fleet.host(name), fleet.ssh_settings) as ssh:
            return [ssh.run(Command(f"sleep 0.0$RANDOM; echo {name}-{worker}-{i}")).stdout
                    for i in range(5)]

    jobs = [(name, worker) for name in fleet.names for worker in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(work, jobs))
    assert outputs == [[f"{n}-{w}-{i}\n" for i in range(5)] for n, w in jobs]


@pytest.fixture(scope="module")
def password_sudo_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway user whose sudo rule needs a password (nobody can type one: it has none)."""
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root")
    name = f"mbtest{os.getpid()}"
    # "*" is no valid password but not a locked account, so sshd still lets the key in.
    _retry(["useradd", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh",
            "--password", "*", name])
    rule = Path("/etc/sudoers.d") / name
    rule.write_text(f"{name} ALL=(ALL:ALL) ALL\n")
    rule.chmod(0o440)
    try:
        yield name
    finally:
        rule.unlink(missing_ok=True)
        _retry(["userdel", name])


def _retry(argv: list[str]) -> None:
    """useradd/userdel fail while another xdist worker holds the /etc/passwd lock."""
    for _ in range(20):
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(argv, check=True)


def test_sudo_that_needs_a_password_fails_at_once(fleet: Fleet, password_sudo_user: str) -> None:
    host = fleet.host(fleet.names[0]).model_copy(update={"user": password_sudo_user})
    with SshTransport(host, fleet.ssh_settings) as ssh:
        assert ssh.run(Command("id -un")).stdout == f"{password_sudo_user}\n"
        result = ssh.run(Command("id -u", sudo=True, timeout=30))
    assert result.rc == 1 and "password is required" in result.stderr
    assert result.duration < 5


# ------------------------------------------------------------------------------ the fleet


def test_fleet_inventory_resolves_to_the_fleet_hosts(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(fleet.inventory_yaml())
    resolved = resolve_inventory(load_inventory(path))
    assert list(resolved.hosts.values()) == fleet.hosts
    assert resolved.groups["web"] == (fleet.names[0],)
    assert resolved.groups["db"] == tuple(fleet.names[1:])


def test_fleet_config_points_the_bot_at_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(fleet.config_yaml(tmp_path / "state"))
    assert load_settings(path).ssh == fleet.ssh_settings


def test_fleet_without_sshd_fails_with_the_install_hint(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="apt-get install openssh-server"):
        Fleet(tmp_path, sshd=str(tmp_path / "no-sshd")).start()
