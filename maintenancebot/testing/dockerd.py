"""A throwaway Docker daemon for tests and the demo: real `dockerd`, private everything.

Owns one `dockerd` process and the files it uses: a data root and log under `workdir`, and a short
private directory under /tmp for its exec root and API socket (unix socket paths are limited to
108 bytes, and dockerd puts containerd's sockets below the exec root). The daemon runs with the
vfs storage driver and no networking of its own (no bridge, no iptables, no IP forwarding), with
an empty config file, so it neither needs nor changes anything of the machine's. A few stdlib
helpers (`import_image`, `create_container`, `request`) seed it through the Engine API.

It must not touch the system daemon, /var/lib/docker, /etc/docker or the host's network settings,
and must not import the `docker` SDK (only the docker_prune action does). It needs root and the
Debian package `docker.io` (dockerd, containerd, runc); without them `start` raises `DockerdError`
with the install hint, never a silent skip.
"""

from __future__ import annotations

import grp
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode

DOCKERD = "dockerd"
INSTALL_HINT = "install the Debian package docker.io (apt-get install docker.io, or `make setup`)"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


class DockerdError(RuntimeError):
    """The daemon could not be started (not installed, not root, or it exited)."""


class Dockerd:
    """`with Dockerd(workdir) as daemon:` a running daemon at `daemon.socket` (`daemon.url`)."""

    def __init__(self, workdir: Path, *, dockerd: str = DOCKERD) -> None:
        self.workdir = Path(workdir).absolute()
        self._dockerd = dockerd
        self._run_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._state: dict[str, Any] = {}  # shared with the finalizer: the process, the run dir
        weakref.finalize(self, _shutdown, self._state)

    @property
    def socket(self) -> str:
        if self._run_dir is None:
            raise DockerdError("the daemon is not started")
        return str(self._run_dir / "docker.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.workdir / "dockerd.log"

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start dockerd and wait until its API answers `/_ping`."""
        if self._proc is not None:
            return self
        binary = _require(self._dockerd)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json
        self._run_dir = Path(tempfile.mkdtemp(prefix="mbdock-", dir="/tmp"))
        self._state["run_dir"] = self._run_dir
        with self.log.open("ab") as log:
            # A session of its own, so that stop() can end dockerd and its containerd together.
            self._proc = subprocess.Popen(
                self._command(binary), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        self._state["proc"] = self._proc
        self._await_ready()
        return self

    def stop(self) -> None:
        """Stop the daemon (TERM, then KILL) and remove its run directory. Idempotent."""
        _shutdown(self._state)
        self._proc = None
        self._run_dir = None

    def _command(self, binary: str) -> list[str]:
        assert self._run_dir is not None
        return [
            binary, "--config-file", str(self.workdir / "daemon.json"),
            "--storage-driver", "vfs", "--bridge=none", "--iptables=false",
            "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--data-root", str(self.workdir / "data"), "--exec-root", str(self._run_dir / "exec"),
            "--pidfile", str(self._run_dir / "dockerd.pid"), "-H", self.url,
            "--group", grp.getgrgid(os.getgid()).gr_name,
        ]

    def _await_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.ping():
            rc = self._proc.poll()
            if rc is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise DockerdError(f"dockerd exited (rc {rc}):\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise DockerdError(f"dockerd did not answer within {_START_TIMEOUT:g}s; see {self.log}")
            time.sleep(0.05)

    # ----------------------------------------------------------------------------- Engine API

    def ping(self) -> bool:
        try:
            status, body = self.request("GET", "/_ping", timeout=2.0)
        except OSError:
            return False
        return status == 200 and body == b"OK"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0
                ) -> tuple[int, bytes]:
        """One Engine API call over the unix socket: (HTTP status, body)."""
        conn = _UnixHTTPConnection(self.socket, timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def import_image(self, ref: str, files: dict[str, bytes]) -> str:
        """`docker import` of a tar holding `files`, tagged `ref` (repo:tag); returns the id."""
        repo, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
        query = urlencode({"fromSrc": "-", "repo": repo, "tag": tag})
        status, body = self.request("POST", f"/images/create?{query}", _tar(files),
                                    {"Content-Type": "application/x-tar"})
        _check(status, body, f"import {ref}")
        return self.image_id(ref)

    def image_id(self, ref: str) -> str:
        status, body = self.request("GET", f"/images/{ref}/json")
        _check(status, body, f"inspect {ref}")
        image_id: str = json.loads(body)["Id"]
        return image_id

    def create_container(self, image: str, name: str | None = None) -> str:
        """Create (not start) a container from `image`; returns its id."""
        spec = {"Image": image, "Cmd": ["/none"], "HostConfig": {"NetworkMode": "none"}}
        path = "/containers/create" + (f"?{urlencode({'name': name})}" if name else "")
        status, body = self.request("POST", path, json.dumps(spec).encode(),
                                    {"Content-Type": "application/json"})
        _check(status, body, f"create a container from {image}")
        container_id: str = json.loads(body)["Id"]
        return container_id


# --------------------------------------------------------------------------------- helpers


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _require(dockerd: str) -> str:
    binary = shutil.which(dockerd)
    if binary is None:
        raise DockerdError(f"{dockerd} not found: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise DockerdError("dockerd needs root (rootless mode is not set up by this helper)")
    return binary


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _check(status: int, body: bytes, what: str) -> None:
    if status >= 300:
        raise DockerdError(f"{what}: HTTP {status}: {body[:500].decode(errors='replace')}")


def _shutdown(state: dict[str, Any]) -> None:
    """TERM the daemon's session (dockerd and its containerd), KILL what is left, clean up."""
    proc: subprocess.Popen[bytes] | None = state.pop("proc", None)
    if proc is not None and proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc is not None:
        _signal_group(proc.pid, signal.SIGKILL)  # a containerd that outlived dockerd
    run_dir: Path | None = state.pop("run_dir", None)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
