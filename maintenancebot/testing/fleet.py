"""A throwaway fleet of real OpenSSH sshd hosts on loopback, for tests, the demo and benchmarks.

Owns everything under its `workdir`: a client key, a shared authorized_keys, the known_hosts file,
and per host a host key, sshd_config, pid and log file, plus one `/usr/sbin/sshd -D -e` process
listening on the host's own address 127.0.0.N (N = 2, 3, ...) and a free port. Each host also gets
an empty directory `workdir/hosts/<name>/` (on this machine, like the hosts themselves) that tests
hand to runbooks as the host var `root`. It must not touch the system sshd, its config, systemd or
~/.ssh, and must not import paramiko: it describes hosts as `models.Host`/`SshSettings` only.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from maintenancebot.models import Host, SshSettings

SSHD = "/usr/sbin/sshd"
_READY_LINE = "Server listening on"
_START_TIMEOUT = 30.0
_PORT_RETRIES = 3


class FleetError(RuntimeError):
    """The fleet could not be set up (sshd missing, a host would not start)."""


@dataclass
class _Node:
    name: str
    address: str
    port: int
    root: Path
    home: Path  # sshd's own files: config, host key, pid, log
    log_offset: int = 0  # where the current process's log starts

    @property
    def log(self) -> Path:
        return self.home / "sshd.log"


class Fleet:
    """`count` sshd hosts named PREFIX-01, PREFIX-02, ...; use as a context manager or start()/stop().

    Group `web` is the first half of the hosts (at least one), group `db` the rest.
    """

    def __init__(
        self,
        workdir: Path,
        count: int = 3,
        *,
        prefix: str = "host",
        user: str | None = None,
        sshd: str = SSHD,
        connect_timeout: float = 5.0,
        sshd_options: Sequence[str] = (),
        pid_namespaces: bool = False,
    ) -> None:
        """`pid_namespaces`: each sshd in a pid namespace of its own (`unshare`, root only), so
        that a host sees its own processes only, as a machine does (the benchmarks)."""
        if count < 1:
            raise ValueError("a fleet needs at least one host")
        self.workdir = Path(workdir).absolute()
        self.user = user or getpass.getuser()
        self.connect_timeout = connect_timeout
        self._sshd = sshd
        self._pid_namespaces = pid_namespaces
        width = max(2, len(str(count)))
        self.names = [f"{prefix}-{i + 1:0{width}d}" for i in range(count)]
        self._half = max(1, count // 2)
        self._extra_options: list[str] = []
        self._sshd_options = list(sshd_options)  # first in the file: sshd keeps a keyword's first value
        self._nodes = {name: self._node(i, name) for i, name in enumerate(self.names)}
        # The running sshd of each host; shared with the finalizer, so every sshd dies with the
        # interpreter even when nobody calls stop().
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        weakref.finalize(self, _kill_all, self._procs)

    def _node(self, index: int, name: str) -> _Node:
        # 127.0.0.2 .. 127.0.0.254, then 127.0.1.2 ...: every host has its own address.
        address = f"127.0.{index // 253}.{index % 253 + 2}"
        return _Node(name, address, 0, self.workdir / "hosts" / name, self.workdir / "sshd" / name)

    # ----------------------------------------------------------------------------- paths

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    def root(self, name: str) -> Path:
        return self._nodes[name].root

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Generate keys, start every sshd concurrently and wait until each one listens."""
        if self._procs:
            return self
        _require_tools(self._sshd)
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for node in self._nodes.values():
            node.root.mkdir(parents=True, exist_ok=True)
            node.home.mkdir(parents=True, exist_ok=True)
        self._generate_keys()
        self.authorized_keys.write_text(_public_key(self.client_key) + "\n")
        self._extra_options = _version_options(self._sshd)
        nodes = list(self._nodes.values())
        for node in nodes:
            node.port = _free_port(node.address)
            self._spawn(node)
        self._await_listening(nodes)
        self._write_known_hosts(self.known_hosts, {})
        return self

    def stop(self) -> None:
        """Kill every sshd and every session it serves. Idempotent."""
        _kill_all(self._procs)

    def stop_host(self, name: str) -> None:
        """Make `name` unreachable: its sshd and all its open connections die, like a crash."""
        proc = self._procs.pop(name, None)
        if proc is not None:
            _kill_tree([proc])

    def start_host(self, name: str) -> None:
        """Bring a stopped host back on the same address, port and host key."""
        if name not in self._procs:
            self._spawn(self._nodes[name])
            self._await_listening([self._nodes[name]])

    # ----------------------------------------------------------------------------- hosts

    @property
    def hosts(self) -> list[Host]:
        return [self.host(name) for name in self.names]

    def host(self, name: str, *, via: str | None = None) -> Host:
        """`name` as the transports see it; `via` names another fleet host to use as jump host."""
        node = self._nodes[name]
        return Host(
            name=name,
            address=node.address,
            port=node.port,
            user=self.user,
            identity_file=str(self.client_key),
            groups=(self.group_of(name), "all"),
            vars={"root": str(node.root)},
            jump=self.host(via) if via else None,
        )

    def group_of(self, name: str) -> str:
        return "web" if self.names.index(name) < self._half else "db"

    @property
    def ssh_settings(self) -> SshSettings:
        return self._settings(self.known_hosts)

    def wrong_key_settings(self, name: str) -> SshSettings:
        """Settings whose known_hosts lists a different key for `name`: a 'changed' host key."""
        path = self.workdir / f"known_hosts.wrong-{name}"
        self._write_known_hosts(path, {name: _public_key(self._alternate_key())})
        return self._settings(path)

    def unknown_key_settings(self, name: str) -> SshSettings:
        """Settings whose known_hosts lacks `name`: an 'unknown' host key."""
        path = self.workdir / f"known_hosts.without-{name}"
        self._write_known_hosts(path, {name: None})
        return self._settings(path)

    def _settings(self, known_hosts: Path) -> SshSettings:
        return SshSettings(
            known_hosts=str(known_hosts),
            identity_file=str(self.client_key),
            connect_timeout=self.connect_timeout,
        )

    # ----------------------------------------------------------------------------- documents

    def inventory_yaml(self) -> str:
        """An inventory file (DESIGN.md §4) for the fleet, with `vars: {root: ...}` per host."""
        q = json.dumps  # JSON strings are valid YAML scalars and quote any path safely
        web, db = self.names[: self._half], self.names[self._half :]
        lines = [
            "# A throwaway fleet of sshd hosts on loopback (maintenancebot.testing.fleet).",
            f"defaults: {{user: {q(self.user)}, identity_file: {q(str(self.client_key))}}}",
            "groups:",
            f"  web: {{hosts: {q(web)}}}",
            f"  db: {{hosts: {q(db)}}}",
            "hosts:",
        ]
        for node in self._nodes.values():
            lines.append(
                f"  {node.name}: {{address: {q(node.address)}, port: {node.port},"
                f" vars: {{root: {q(str(node.root))}}}}}"
            )
        return "\n".join(lines) + "\n"

    def config_yaml(self, state_dir: Path, *, runbooks: Path | None = None,
                    inventory: Path | None = None, known_hosts: Path | None = None) -> str:
        """A config file (DESIGN.md §4) pointing the bot at this fleet's keys (`known_hosts`:
        another file naming the same keys, e.g. at a proxy's ports)."""
        q = json.dumps
        lines = [f"state_dir: {q(str(state_dir))}"]
        if runbooks is not None:
            lines.append(f"runbooks: {q(str(runbooks))}")
        if inventory is not None:
            lines.append(f"inventory: {q(str(inventory))}")
        lines += [
            "ssh:",
            f"  known_hosts: {q(str(known_hosts or self.known_hosts))}",
            f"  identity_file: {q(str(self.client_key))}",
            f"  connect_timeout: {self.connect_timeout:g}s",
        ]
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------------------------- logs

    def sshd_log(self, name: str) -> str:
        log = self._nodes[name].log
        return log.read_text(errors="replace") if log.exists() else ""

    def logins(self, name: str) -> int:
        """How many connections `name` has authenticated so far (to prove connection reuse)."""
        return self.sshd_log(name).count("Accepted publickey for ")

    def connections(self, name: str) -> int:
        """How many connections `name`'s sshd serves right now (one process each)."""
        proc = self._procs.get(name)
        return 0 if proc is None else len(_children(proc.pid))

    # ----------------------------------------------------------------------------- internals

    def _generate_keys(self) -> None:
        keys = [self.client_key] + [node.home / "host_ed25519" for node in self._nodes.values()]
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            list(pool.map(_keygen, keys))

    def _alternate_key(self) -> Path:
        path = self.workdir / "alternate_host_ed25519"
        if not path.exists():
            _keygen(path)
        return path

    def _spawn(self, node: _Node) -> None:
        config = node.home / "sshd_config"
        config.write_text(self._sshd_config(node))
        node.log_offset = node.log.stat().st_size if node.log.exists() else 0
        with node.log.open("ab") as log:
            # --kill-child: sshd, the namespace's init, and with it all the host's processes
            # die with `unshare`.
            unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
            self._procs[node.name] = subprocess.Popen(
                [*(unshare if self._pid_namespaces else []), self._sshd, "-D", "-e", "-f",
                 str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )

    def _sshd_config(self, node: _Node) -> str:
        options = [
            *self._sshd_options,
            f"Port {node.port}",
            f"ListenAddress {node.address}",
            f'HostKey "{node.home / "host_ed25519"}"',
            f'PidFile "{node.home / "sshd.pid"}"',
            f'AuthorizedKeysFile "{self.authorized_keys}"',
            # sshd reads that file as the login user, who may not reach into workdir; this
            # fallback lets any local account (e.g. a throwaway non-root user) use the key too.
            f'AuthorizedKeysCommand {shutil.which("cat")} "{self.authorized_keys}"',
            f"AuthorizedKeysCommandUser {getpass.getuser()}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",  # jump-host tests tunnel through fleet hosts
            "X11Forwarding no",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel INFO",  # logins() counts 'Accepted publickey' lines
            "LoginGraceTime 30",
            # Tests and benchmarks open many connections and sessions at once.
            "MaxStartups 200:30:500",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            # bash sources ~/.bashrc for commands run by sshd (at SHLVL 0), and a dotfile like
            # `pyenv init` there costs ~0.1 s per command on a host that is really this
            # machine; SHLVL=1 turns that off, so benchmarks measure the bot, not our dotfiles.
            "SetEnv SHLVL=1",
            *self._extra_options,
        ]
        return "\n".join(options) + "\n"

    def _await_listening(self, nodes: list[_Node]) -> None:
        """Wait until every sshd says it listens; move a host whose port was taken meanwhile."""
        pending = {node.name: node for node in nodes}
        retries = {node.name: _PORT_RETRIES for node in nodes}
        deadline = time.monotonic() + _START_TIMEOUT
        while pending:
            for name, node in list(pending.items()):
                text = _log_since(node)
                if _READY_LINE in text:
                    del pending[name]
                elif self._procs[name].poll() is not None:
                    if "Address already in use" not in text or retries[name] == 0:
                        raise FleetError(f"sshd for {name} exited:\n{text[-2000:]}")
                    retries[name] -= 1
                    node.port = _free_port(node.address)
                    self._spawn(node)
            if pending and time.monotonic() > deadline:
                raise FleetError(f"sshd did not start within {_START_TIMEOUT:g}s: {sorted(pending)}")
            if pending:
                time.sleep(0.01)

    def known_hosts_via(self, path: Path, ports: dict[str, int]) -> Path:
        """A known_hosts naming each host at another port of its own address (a proxy's), with
        the host's own key."""
        self._write_known_hosts(path, {}, ports)
        return path

    def _write_known_hosts(self, path: Path, override: dict[str, str | None],
                           ports: dict[str, int] | None = None) -> None:
        """known_hosts in OpenSSH's `[addr]:port` form; `override` swaps or (None) drops keys,
        `ports` names hosts at other ports."""
        lines = []
        for node in self._nodes.values():
            key = override.get(node.name, _public_key(node.home / "host_ed25519"))
            if key is not None:
                lines.append(f"[{node.address}]:{(ports or {}).get(node.name, node.port)} {key}")
        path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------- helpers


def _require_tools(sshd: str) -> None:
    if not os.access(sshd, os.X_OK):
        raise FleetError(
            f"{sshd} not found: the test fleet needs OpenSSH's server; "
            "run `apt-get install openssh-server` (or `make setup`)"
        )
    if shutil.which("ssh-keygen") is None:
        raise FleetError("ssh-keygen not found: run `apt-get install openssh-client`")


def _version_options(sshd: str) -> list[str]:
    """Options only some sshd versions know. OpenSSH 9.8+ penalizes a source address after
    failed logins, which would lock out the tests that fail on purpose (wrong keys)."""
    out = subprocess.run([sshd, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return ["PerSourcePenalties no"] if version >= (9, 8) else []


def _keygen(path: Path) -> None:
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)  # ssh-keygen would ask before overwriting
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )


def _public_key(private: Path) -> str:
    """'ssh-ed25519 AAAA...' without the comment."""
    kind, blob = private.with_name(private.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_since(node: _Node) -> str:
    try:
        with node.log.open("rb") as log:
            log.seek(node.log_offset)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    _kill_tree(list(procs.values()))
    procs.clear()


def _kill_tree(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each sshd and its descendants (the per-connection processes and their shells)."""
    victims = _descendants({proc.pid for proc in procs if proc.poll() is None})
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait()


def _descendants(roots: set[int]) -> list[int]:
    """`roots` and every process below them, read from /proc in one pass."""
    children = _process_tree()
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _children(pid: int) -> list[int]:
    return _process_tree().get(pid, [])


def _process_tree() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry.name))
    return children
