"""The systemd notify protocol (sd_notify(3)): READY, STATUS, WATCHDOG, RELOADING, STOPPING.

A datagram of `KEY=value` lines to the unix socket named by $NOTIFY_SOCKET ('@' = abstract
namespace). Twenty lines of stdlib instead of a dependency; without $NOTIFY_SOCKET (not run by
systemd, or Type=simple) every call is a no-op. A failed send is logged, never raised: systemd
being unreachable must not take the daemon down (the watchdog will, if it must).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str) -> bool:
        """Send one message (`send(READY="1", STATUS="...")`); True if it left the process."""
        if not self._address:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("systemd notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def reloading(self) -> bool:
        return self.send(RELOADING="1", STATUS="reloading runbooks and inventory")

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING="1", STATUS=status)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec (systemd's advice), if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000
