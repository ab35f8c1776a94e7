"""A round-trip delay for kernels without `tc netem`: a forwarding proxy that holds each chunk.

For every host, a listener on the host's own loopback address (another port) forwards to the
host's sshd and back, holding every chunk it reads for `one_way` seconds before writing it on,
in order, in each direction: a round trip then costs 2 × `one_way`, as netem on loopback does.
It runs on an asyncio loop in a thread of the benchmark's own process, so its CPU is the
machine's (the `machine` column) but never a tool's. Unlike netem it only delays: no jitter, no
loss, and a chunk's size is whatever one read returned.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from types import TracebackType
from typing import Self

_CHUNK = 65536


class DelayProxy:
    """`ports[name]`: where `name`'s delayed listener is, on the host's own address."""

    def __init__(self, targets: dict[str, tuple[str, int]], one_way: float) -> None:
        self._targets = targets
        self._one_way = one_way
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="delay-proxy", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(30) or len(self.ports) != len(self._targets):
            raise RuntimeError("the delay proxy did not start its listeners")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        for name, (address, port) in self._targets.items():
            server = self._loop.run_until_complete(asyncio.start_server(
                functools.partial(self._forward, target=(address, port)), address, 0))
            self._servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _shut(self) -> None:
        for server in self._servers:
            server.close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _forward(self, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter, target: tuple[str, int]) -> None:
        try:
            host_reader, host_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(self._pipe(client_reader, host_writer),
                                 self._pipe(host_reader, client_writer), return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the proxy is shutting down: end quietly, not as a failed connection
        finally:
            for writer in (client_writer, host_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads go on while earlier chunks wait out their delay: a queue keeps their order."""
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await held.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    if not data:  # the other side finished sending: so do we
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
                except ConnectionError:
                    return

        delivering = asyncio.create_task(deliver())
        while True:
            try:
                data = await reader.read(_CHUNK)
            except ConnectionError:
                data = b""  # a reset ends this direction as an EOF would
            held.put_nowait((time.monotonic() + self._one_way, data))
            if not data:
                break
        await delivering
