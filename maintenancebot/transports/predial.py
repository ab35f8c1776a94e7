"""Connections that open while the rest of a run is still being set up.

The hosts a run starts with are known as soon as its plan is. `Predial` starts their connections
then, in the background, so that loading the engine and the reporting, opening the store and
writing the run's first records overlap the round trips and the hosts' key exchange instead of
coming before them (on 50 local hosts, a tenth of the run). Only connecting happens early:
nothing runs on a host before the engine has recorded the step, as with any transport.

A pre-dialed transport behaves as a fresh one: `connect()` waits for its handshake and raises
what the handshake raised, once, so the host is recorded unreachable and not dialed twice.

Owns: the background dials and closing the connections no host took.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

from maintenancebot.models import Host
from maintenancebot.transports.base import Command, CommandResult, Transport, TransportFactory


class Predial:
    """Connections to `hosts`, opening now; `open` hands each one out once, else a fresh one."""

    def __init__(self, hosts: Iterable[Host], open_transport: TransportFactory) -> None:
        self._open_transport = open_transport
        self._lock = threading.Lock()
        self._dialing = {host.name: _Dialing(open_transport(host)) for host in hosts}
        # Starting a thread waits until it runs, which under the handshakes' GIL contention
        # is a switch interval each: a thread of its own starts them, not the caller's.
        threading.Thread(target=self._start, args=(list(self._dialing.values()),),
                         name="predial", daemon=True).start()

    @staticmethod
    def _start(dials: list[_Dialing]) -> None:
        for dialing in dials:
            dialing.start()

    def open(self, host: Host) -> Transport:
        """A `TransportFactory`: the connection already opening for `host`, if any."""
        with self._lock:
            dialing = self._dialing.pop(host.name, None)
        if dialing is None:
            return self._open_transport(host)
        if dialing.host != host:  # another host by that name (a plan changed): never reuse it
            dialing.close()
            return self._open_transport(host)
        return dialing

    def close(self) -> None:
        """Close the connections no host took: refused starts, a run that could not begin."""
        with self._lock:
            left, self._dialing = list(self._dialing.values()), {}
        for dialing in left:
            dialing.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class _Dialing:
    """A `Transport` whose `connect()` runs in a thread of its own from `start()` on."""

    def __init__(self, transport: Transport) -> None:
        self.host = transport.host
        self._transport = transport
        self._lock = threading.Lock()
        self._dialed = False
        self._done = threading.Event()
        self._closed = False
        self._error: Exception | None = None

    def start(self) -> None:
        with self._lock:
            if self._closed:  # closed before its turn came: never dialed at all
                return
        threading.Thread(target=self._dial, name=f"dial {self.host.name}", daemon=True).start()

    def _dial(self) -> None:
        try:
            self._transport.connect()
        except Exception as exc:  # noqa: BLE001 - raised by the host's own connect()
            self._error = exc
        finally:
            with self._lock:
                self._dialed = True
                closed = self._closed
            self._done.set()
            if closed:  # closed while dialing: the connection that just opened is nobody's
                self._transport.close()

    def connect(self) -> None:
        self._done.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error
        self._transport.connect()  # open already; reopens one lost since, as any transport

    def run(self, command: Command, *, before_start: Callable[[], object] | None = None
            ) -> CommandResult:
        self.connect()
        return self._transport.run(command, before_start=before_start)

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self.connect()
        self._transport.put(data, path, mode)

    def get(self, path: str) -> bytes:
        self.connect()
        return self._transport.get(path)

    def close(self) -> None:
        """Never waits for a handshake: one still going is closed by its dial as it ends."""
        with self._lock:
            self._closed = True
            if not self._dialed:
                return
        self._transport.close()
