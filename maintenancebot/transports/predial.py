"""Connections that open while the rest of a run is still being set up.

The hosts a run starts with are known as soon as its plan is. `Predial` starts their connections
then, in the background, so that loading the engine and the reporting and writing the run's
first records overlap the round trips and the hosts' key exchange instead of coming before them
(the first connection opens ~35 ms sooner; on loopback, where the handshakes are CPU work under
the one GIL that the set-up shares, nothing measurable). Only connecting happens early: nothing
runs on a host before the engine has recorded the step, as with any transport.

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
        # Each dial's thread waits for `together` once started: starting a thread waits until it
        # runs, and behind busy handshakes that is a GIL switch interval each (half a second
        # over 50 hosts). Started idle, all of them start in a few ms and dial together.
        together = threading.Event()
        self._dialing: dict[str, _Dialing] = {}
        try:
            for host in hosts:
                self._dialing[host.name] = _Dialing(open_transport(host), together)
        except BaseException:
            self.close()  # before they dial: none of them connects
            raise
        finally:
            together.set()

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
    """A `Transport` whose `connect()` runs in a thread of its own, once `go` is set."""

    def __init__(self, transport: Transport, go: threading.Event) -> None:
        self.host = transport.host
        self._transport = transport
        self._lock = threading.Lock()
        self._done = threading.Event()  # the dial has ended, set under `_lock`
        self._closed = False
        self._error: Exception | None = None
        threading.Thread(target=self._dial, args=(go,), name=f"dial {self.host.name}",
                         daemon=True).start()

    def _dial(self, go: threading.Event) -> None:
        go.wait()
        try:
            with self._lock:
                closed = self._closed
            if not closed:  # closed before it began: it never connects
                self._transport.connect()
        except Exception as exc:  # noqa: BLE001 - raised by the host's own connect()
            self._error = exc
        finally:
            with self._lock:
                self._done.set()
                closed = self._closed
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
            if not self._done.is_set():
                return
        self._transport.close()
