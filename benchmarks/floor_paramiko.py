"""The raw-paramiko floor: what the 5-step workload costs with nothing but paramiko around it.

One connection per host, a thread per host, every host's commands in order on that connection,
stdout/stderr read and the exit status checked. The host key is verified against the known_hosts
file and the socket has TCP_NODELAY, as in maintenancebot's transport: the floor is a careful
hand-written script, not a strawman. No store, no templates, no plan, no report.

    python benchmarks/floor_paramiko.py HOSTS.json

HOSTS.json: {"known_hosts": PATH, "key": PATH, "hosts": [{"address", "port", "user",
"commands": [...]}, ...]}. Exits 1 if any host failed or any command had a non-zero rc.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import paramiko


def run_host(host: dict[str, Any], key: paramiko.PKey, known_hosts: paramiko.HostKeys,
             failures: list[str]) -> None:
    try:
        sock = socket.create_connection((host["address"], host["port"]), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        # Only this host's entry: known_hosts is parsed once for all threads, in main().
        name = f"[{host['address']}]:{host['port']}"
        for kind, host_key in (known_hosts.lookup(name) or {}).items():
            client.get_host_keys().add(name, kind, host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(host["address"], port=host["port"], username=host["user"], pkey=key,
                       sock=sock, allow_agent=False, look_for_keys=False, timeout=10)
        transport = client.get_transport()
        assert transport is not None  # connect() returned: there is one
        try:
            for command in host["commands"]:
                channel = transport.open_session()
                channel.exec_command(command)
                channel.shutdown_write()
                stdout = channel.makefile("rb").read()
                channel.makefile_stderr("rb").read()
                rc = channel.recv_exit_status()
                channel.close()
                if rc != 0:
                    failures.append(f"{host['address']}: {command!r} exited {rc}: {stdout[-200:]!r}")
                    return
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
        failures.append(f"{host['address']}:{host['port']}: {type(exc).__name__}: {exc}")


def main(path: str) -> int:
    spec = json.loads(Path(path).read_text())
    key = paramiko.Ed25519Key.from_private_key_file(spec["key"])
    known_hosts = paramiko.HostKeys(spec["known_hosts"])
    failures: list[str] = []
    threads = [threading.Thread(target=run_host, args=(host, key, known_hosts, failures))
               for host in spec["hosts"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
