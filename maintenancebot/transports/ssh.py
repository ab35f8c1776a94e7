"""The SSH transport: one verified, key-authenticated paramiko connection per host, reused.

Owns everything paramiko: connecting (optionally through jump hosts), host key verification
against a known_hosts file (which lines speak of a host: `ssh_hostkeys`), running commands in
the connection's shell (`ssh_shell`) or on session channels of their own (their output read as
it arrives: `ssh_output`), SFTP, and translating every paramiko and socket exception into our
`TransportError` tree (`raise ... from exc`). It is the only module that imports paramiko. It
must not accept an unknown or changed host key, try passwords, read ~/.ssh on its own, or decide
anything about what a command means: a non-zero rc is a result.
"""

from __future__ import annotations

import functools
import getpass
import logging
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from errno import ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

# paramiko imports `invoke` (and with it unittest.mock and asyncio: ~50 ms of every start) only
# for `Match exec` lines of an ssh_config, and treats it as optional. We never read ssh_config.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]

import paramiko  # type: ignore[import-untyped,unused-ignore]
from paramiko.common import MSG_CHANNEL_REQUEST  # type: ignore[import-untyped,unused-ignore]
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey  # type: ignore[import-untyped,unused-ignore]

from maintenancebot.errors import CommandTimeout, ConnectError, HostKeyError, TransportError
from maintenancebot.models import Host, SshSettings
from maintenancebot.transports.base import Command, CommandResult, controller_deadline, wrap_script
from maintenancebot.transports.ssh_hostkeys import (
    known_host_lines,
    known_hosts_name,
    unknown_key_error,
)
from maintenancebot.transports.ssh_output import collect, remaining
from maintenancebot.transports.ssh_shell import SHELL_COMMAND, ShellEnded, ShellSession, fits

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30
_TIMEOUT_RCS = (124, 137)  # GNU timeout: 124 after SIGTERM, 128+9 when it had to SIGKILL
# Paramiko errors that mean "the connection or channel broke".
_LINK_ERRORS = (paramiko.SSHException, OSError, EOFError)
# What paramiko says when the server stays silent: the banner timer or the negotiation timer
# ("No existing session") fires first, whichever wins the race.
_HANDSHAKE_TIMEOUT = re.compile("protocol banner|No existing session")
# AEAD first: its tag is checked inside OpenSSL, where paramiko checks an HMAC in Python, byte by
# byte (about a fifth of the controller's CPU per command). Every OpenSSH since 6.2 offers it;
# paramiko's usual order follows for any server that does not.
_PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_ERRNO_REASONS = {
    ECONNREFUSED: "connection refused (is sshd listening on that port?)",
    EHOSTUNREACH: "no route to host",
    ENETUNREACH: "network unreachable",
    ETIMEDOUT: "connection timed out",
}


class SshTransport:
    """`Transport` over SSH. Used by one thread at a time; any number of instances in parallel."""

    def __init__(self, host: Host, ssh: SshSettings) -> None:
        self.host = host
        self._ssh = ssh
        self._hops: list[paramiko.SSHClient] = []  # jump hosts first, the target last
        self._sftp: paramiko.SFTPClient | None = None
        self._shell: ShellSession | None = None

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- connection

    def connect(self) -> None:
        """Connect unless connected. run/put/get call it too, so after a lost connection (a
        reboot step, say) the next operation reconnects; the one in flight still fails."""
        if self._hops and _alive(self._hops[-1]):
            return
        self.close()
        hops: list[paramiko.SSHClient] = []
        try:
            self._open_chain(self.host, hops)
        except BaseException:
            _close_all(hops)
            raise
        self._hops = hops

    def close(self) -> None:
        sftp, self._sftp = self._sftp, None
        hops, self._hops = self._hops, []
        self._shell = None  # closed with its connection
        if sftp is not None:
            _quietly(sftp.close)
        _close_all(hops)

    def _open_chain(self, host: Host, hops: list[paramiko.SSHClient]) -> None:
        """Connect to `host`, first through its jump hosts (each verified the same way)."""
        # Local checks first, so a missing key or known_hosts costs no network round trip.
        client = self._new_client(host)
        pkey = self._private_key(host)
        if host.jump is None:
            sock: socket.socket | paramiko.Channel = self._dial(host)
        else:
            self._open_chain(host.jump, hops)
            sock = self._tunnel(hops[-1], host.jump, host)
        hops.append(self._handshake(client, host, sock, pkey))

    def _new_client(self, host: Host) -> paramiko.SSHClient:
        """A client that knows only `host`'s keys from known_hosts and rejects anything else."""
        known_hosts = self._known_hosts_file(host)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_RejectUnknownKey(host, known_hosts))
        keys, name = client.get_host_keys(), known_hosts_name(host)
        for number, line in known_host_lines(known_hosts, name):
            try:
                entry = HostKeyEntry.from_line(line, number)
            except (InvalidHostKey, paramiko.SSHException, ValueError) as exc:
                raise HostKeyError(f"{known_hosts}:{number}: unreadable host key: {exc}") from exc
            if entry is not None:
                keys.add(name, entry.key.get_name(), entry.key)
        return client

    def _dial(self, host: Host) -> socket.socket:
        timeout = self._ssh.connect_timeout
        try:
            sock = socket.create_connection((host.address, host.port), timeout=timeout)
        except OSError as exc:
            raise _connect_error(host, exc, timeout) from exc
        # Paramiko sends a request as several small packets; with Nagle's algorithm each one
        # waits for the peer's delayed ACK (~40 ms), which made every command ten times slower.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _handshake(
        self, client: paramiko.SSHClient, host: Host, sock: socket.socket | paramiko.Channel,
        pkey: paramiko.PKey | None,
    ) -> paramiko.SSHClient:
        timeout = self._ssh.connect_timeout
        try:
            client.connect(
                hostname=host.address, port=host.port, username=_user(host), pkey=pkey,
                sock=sock, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                channel_timeout=timeout, allow_agent=self._ssh.use_agent, look_for_keys=False,
                transport_factory=_transport,
            )
        except BaseException as exc:
            client.close()
            _quietly(sock.close)
            if isinstance(exc, (*_LINK_ERRORS, ValueError)):  # HostKeyError passes as is
                raise _connect_error(host, exc, timeout) from exc
            raise
        client.get_transport().set_keepalive(KEEPALIVE_SECONDS)
        log.debug("connected to %s (%s:%s)", host.name, host.address, host.port)
        return client

    def _tunnel(self, jump_client: paramiko.SSHClient, jump: Host, host: Host) -> paramiko.Channel:
        """A direct-tcpip channel from the jump host to `host`, used as the target's socket."""
        try:
            return jump_client.get_transport().open_channel(
                "direct-tcpip", (host.address, host.port), ("127.0.0.1", 0),
                timeout=self._ssh.connect_timeout,
            )
        except _LINK_ERRORS as exc:
            reason = exc.text if isinstance(exc, paramiko.ChannelException) else str(exc)
            raise ConnectError(
                f"cannot connect to {host.name} ({host.address}:{host.port}) through jump host "
                f"{jump.name}: {reason}"
            ) from exc

    def _known_hosts_file(self, host: Host) -> Path:
        if not self._ssh.known_hosts:
            raise HostKeyError(
                f"cannot verify the host key of {host.address}:{host.port}: no known_hosts file "
                "is configured (set ssh.known_hosts); unverified keys are never accepted"
            )
        return Path(self._ssh.known_hosts).expanduser()

    def _private_key(self, host: Host) -> paramiko.PKey | None:
        configured = host.identity_file or self._ssh.identity_file
        if configured is None:
            if self._ssh.use_agent:
                return None
            raise ConnectError(
                f"no identity file for {host.name}: set identity_file in the inventory or "
                "ssh.identity_file in the config, or ssh.use_agent: true"
            )
        path = Path(configured).expanduser()
        try:
            stat = path.stat()
            return _load_key(path, stat.st_mtime_ns, stat.st_size)
        except paramiko.PasswordRequiredException as exc:
            raise ConnectError(
                f"identity file {path} is passphrase-protected; load it into ssh-agent and set "
                "ssh.use_agent: true"
            ) from exc
        except (*_LINK_ERRORS, ValueError) as exc:
            raise ConnectError(f"cannot load identity file {path}: {exc}") from exc

    def _client(self) -> paramiko.SSHClient:
        self.connect()
        return self._hops[-1]

    # ----------------------------------------------------------------------------- commands

    def run(self, command: Command, *, before_start: Callable[[], object] | None = None
            ) -> CommandResult:
        """In the connection's shell when the command `fits` it (`ssh_shell` says why), else on
        a session channel of its own."""
        client = self._client()
        started = time.monotonic()
        limit = controller_deadline(command)
        deadline = None if limit is None else started + limit
        try:
            if fits(command):
                rc, out, err = self._run_in_shell(client, command, deadline, before_start)
            else:
                rc, out, err = self._run_on_channel(client, command, deadline, before_start)
        except _LINK_ERRORS as exc:
            raise TransportError(f"{self.host.name}: the SSH connection failed during a command: "
                                 f"{exc}") from exc
        if rc is None:
            raise self._abandoned(command, out, err, time.monotonic() - started)
        return self._result(command, rc, out, err, time.monotonic() - started)

    def _run_in_shell(self, client: paramiko.SSHClient, command: Command, deadline: float | None,
                      before_start: Callable[[], object] | None
                      ) -> tuple[int | None, bytes, bytes]:
        shell = self._shell
        if shell is None or not shell.usable or shell.channel.closed:
            channel = client.get_transport().open_session(timeout=self._ssh.connect_timeout)
            channel.exec_command(SHELL_COMMAND)
            shell = self._shell = ShellSession(channel)
        try:
            return shell.run(command, deadline, before_start)
        except ShellEnded as exc:
            raise TransportError(f"{self.host.name}: {exc}") from exc
        finally:
            if not shell.usable:
                self._shell = None
                _quietly(shell.channel.close)

    def _run_on_channel(self, client: paramiko.SSHClient, command: Command,
                        deadline: float | None, before_start: Callable[[], object] | None
                        ) -> tuple[int | None, bytes, bytes]:
        channel = client.get_transport().open_session(timeout=self._ssh.connect_timeout)
        try:
            if before_start is not None:
                before_start()
            channel.exec_command(_remote_line(command))
            _feed_stdin(channel, command.stdin)
            out, err, done = collect(channel, deadline, command.output_limit)
            if not (done and channel.status_event.wait(remaining(deadline))):
                return None, out, err
            return self._exit_status(channel), out, err
        finally:
            _quietly(channel.close)

    def _abandoned(self, command: Command, out: bytes, err: bytes, duration: float) -> CommandTimeout:
        # The remote `timeout` should have ended it already; closing the channel is all we can
        # do from here, and the remote process may outlive it.
        return CommandTimeout(
            f"{self.host.name}: command still running after {duration:.0f}s (its timeout was "
            f"{command.timeout:g}s); gave up and closed the channel",
            _text(out), _text(err), duration,
        )

    def _exit_status(self, channel: paramiko.Channel) -> int:
        status: int = channel.exit_status
        if status >= 0:
            return status
        if not channel.get_transport().is_active():
            raise TransportError(f"{self.host.name}: connection lost during a command")
        signal_name = getattr(channel, "exit_signal", None)
        if signal_name is not None:
            raise TransportError(f"{self.host.name}: command killed by signal {signal_name}, "
                                 "which this controller does not know")
        raise TransportError(f"{self.host.name}: command ended without an exit status")

    def _result(
        self, command: Command, rc: int, out: bytes, err: bytes, duration: float
    ) -> CommandResult:
        if command.timeout and rc in _TIMEOUT_RCS and duration >= command.timeout:
            raise CommandTimeout(
                f"{self.host.name}: command timed out after {command.timeout:g}s and was killed",
                _text(out), _text(err), duration,
            )
        return CommandResult(rc, _text(out), _text(err), duration)

    # ----------------------------------------------------------------------------- files

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write via a temporary file renamed into place: readers never see half a file, and
        the mode is set before any data lands, so a secret is never readable by others."""
        sftp = self._sftp_client()
        temp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            with sftp.open(temp, "wxb") as handle:  # x: never reuse a planted file
                handle.chmod(mode)
                handle.set_pipelined(True)
                handle.write(data)
            sftp.posix_rename(temp, path)
        except _LINK_ERRORS as exc:
            _quietly(sftp.remove, temp)
            raise TransportError(f"{self.host.name}: cannot write {path}: {_os_reason(exc)}") \
                from exc

    def get(self, path: str) -> bytes:
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as handle:
                handle.prefetch()
                data: bytes = handle.read()
                return data
        except _LINK_ERRORS as exc:
            raise TransportError(f"{self.host.name}: cannot read {path}: {_os_reason(exc)}") \
                from exc

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._client()
        if self._sftp is None:
            try:
                self._sftp = client.open_sftp()
            except _LINK_ERRORS as exc:
                raise TransportError(f"{self.host.name}: cannot start SFTP: {exc}") from exc
        return self._sftp


def _channel_request(channel: paramiko.Channel, message: paramiko.Message) -> None:
    rest = message.get_remainder()
    request = paramiko.Message(rest)
    if request.get_text() != "exit-signal":
        paramiko.Channel._handle_request(channel, paramiko.Message(rest))
        return
    request.get_boolean()  # want_reply: always false for exit-signal
    name = request.get_text()
    number = signal.Signals.__members__.get(f"SIG{name}")
    # An unknown name (another OS's signal) leaves no status: run() then says so.
    channel.exit_signal = name
    if number is not None:
        channel.exit_status = 128 + number
    channel.status_event.set()


class _RejectUnknownKey(paramiko.RejectPolicy):  # type: ignore[misc,unused-ignore]
    """paramiko's RejectPolicy, raising our error with the fix in the message."""

    def __init__(self, host: Host, known_hosts: Path) -> None:
        self._host = host
        self._known_hosts = known_hosts

    def missing_host_key(self, client: object, hostname: str, key: paramiko.PKey) -> None:
        raise unknown_key_error(self._host, self._known_hosts,
                                f"{key.get_name()} {key.fingerprint}")


class _Transport(paramiko.Transport):  # type: ignore[misc,unused-ignore]
    """paramiko's Transport, plus the exit-signal request (RFC 4254 6.10) that paramiko drops:
    a command killed by a signal then has an exit status, 128+N as a shell would say, without a
    shell kept waiting on the host for every step just to say it."""

    _channel_handler_table: ClassVar[dict[int, Callable[..., None]]] = {
        **paramiko.Transport._channel_handler_table, MSG_CHANNEL_REQUEST: _channel_request}


def _transport(sock: socket.socket | paramiko.Channel, **options: object) -> paramiko.Transport:
    transport = _Transport(sock, **options)
    security = transport.get_security_options()
    security.ciphers = _PREFERRED_CIPHERS + tuple(
        cipher for cipher in security.ciphers if cipher not in _PREFERRED_CIPHERS)
    return transport


@functools.lru_cache(maxsize=16)
def _load_key(path: Path, mtime_ns: int, size: int) -> paramiko.PKey:
    """Parsed once per key file and version, not once per host: a 500-host run shares one key.
    Keyed by mtime and size, so a rotated key is read again."""
    return paramiko.PKey.from_path(path)


# ------------------------------------------------------------------------------- errors


def _connect_error(host: Host, exc: BaseException, timeout: float) -> ConnectError:
    where = f"{_user(host)}@{host.address}:{host.port}"
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key of {host.address}:{host.port} CHANGED: it offered "
            f"{exc.key.get_name()} {exc.key.fingerprint} but known_hosts has "
            f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}. This can be a "
            "man-in-the-middle attack; if the host was reinstalled, verify the new key and "
            "replace its known_hosts entry"
        )
    return ConnectError(f"cannot connect to {host.name} ({where}): {_reason(exc, timeout)}")


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, paramiko.AuthenticationException):
        # paramiko's own words only when they add something ("allowed types: ['password']").
        detail = str(exc).strip().rstrip(".")
        said = "" if detail.lower() in ("", "authentication failed") else f" ({detail})"
        return f"authentication failed{said}; is our public key in the host's authorized_keys?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the address ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    if isinstance(exc, paramiko.SSHException) and _HANDSHAKE_TIMEOUT.search(str(exc)):
        return f"no SSH handshake within {timeout:g}s (is an SSH server listening there?)"
    if isinstance(exc, EOFError):
        return "the server closed the connection during the SSH handshake"
    return str(exc) or type(exc).__name__


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# ------------------------------------------------------------------------------- channels


def _remote_line(command: Command) -> str:
    # sshd runs the line with the login shell; `exec` replaces it, so the step costs no shell
    # process of its own on the host (a third of the wrapper's cost). A death by signal then
    # reaches us as exit-signal, which `_Transport` turns into 128+N.
    return f"exec {wrap_script(command)}"


def _feed_stdin(channel: paramiko.Channel, data: bytes | None) -> None:
    if not data:
        channel.shutdown_write()  # EOF at once, so `cat` and friends do not wait for us
        return
    # A thread, because writing stdin while the command fills stdout could otherwise deadlock
    # once both SSH windows are full.
    threading.Thread(target=_send_all, args=(channel, data), daemon=True,
                     name="ssh-stdin").start()


def _send_all(channel: paramiko.Channel, data: bytes) -> None:
    try:
        channel.sendall(data)
        channel.shutdown_write()
    except _LINK_ERRORS:
        pass  # the command exited without reading all its input (like `head`): not an error


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _user(host: Host) -> str:
    return host.user or getpass.getuser()


def _alive(client: paramiko.SSHClient) -> bool:
    transport = client.get_transport()
    return transport is not None and bool(transport.is_active())


def _close_all(clients: list[paramiko.SSHClient]) -> None:
    for client in reversed(clients):  # the target first, then the jump hosts it tunnels through
        _quietly(client.close)


def _quietly(action: Callable[..., object], *args: object) -> None:
    """Cleanup that must never raise (close() is called from error paths and finalizers)."""
    try:
        action(*args)
    except Exception as exc:  # noqa: BLE001 - nothing useful to do with a failed cleanup
        log.debug("ignored during cleanup: %r", exc)
