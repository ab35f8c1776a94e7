"""The daemon's HTTP side: `/healthz` for probes and `/metrics` for Prometheus. Read-only.

It answers from the store's records (so counters survive restarts) and the daemon's live
state, accepts GET only, and changes nothing. The stdlib server is enough for two routes and a
scraper every few seconds; it binds to loopback unless told otherwise (`--listen`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from maintenancebot.store import StoreMetrics

log = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, dict[str, Any]]]


class Live:
    """What the daemon knows that the store does not: its schedule and what runs right now."""

    def __init__(self, next_fires: Mapping[str, datetime | None], running: Iterable[str]) -> None:
        self.next_fires = dict(next_fires)
        self.running = sorted(running)


def render_metrics(stored: StoreMetrics, live: Live | None) -> str:
    """Prometheus text exposition format 0.0.4. Without `live` (no daemon: the timer flavour's
    textfile), only what the store knows."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(labels)} {_number(value)}")

    if live is not None:
        family("maintenancebot_up", "gauge", "1 while the daemon runs.", [({}, 1)])
    family("maintenancebot_runs_total", "counter", "Runs by runbook, status and dry-run.",
           [({"runbook": rb, "status": st, "dry_run": str(dry).lower()}, n)
            for (rb, dry, st), n in sorted(stored.runs.items())])
    family("maintenancebot_hosts_failed_total", "counter",
           "Hosts that failed or were unreachable in real runs.",
           [({"runbook": rb}, n) for rb, n in sorted(stored.hosts_failed.items())])
    out.append("# HELP maintenancebot_step_duration_seconds Duration of executed steps.")
    out.append("# TYPE maintenancebot_step_duration_seconds summary")
    for rb, (total, count) in sorted(stored.step_seconds.items()):
        out.append(f"maintenancebot_step_duration_seconds_sum{_labels({'runbook': rb})} "
                   f"{total:.6f}")
        out.append(f"maintenancebot_step_duration_seconds_count{_labels({'runbook': rb})} "
                   f"{count}")
    family("maintenancebot_last_success_timestamp_seconds", "gauge",
           "When the runbook's last successful real run finished (Unix time).",
           [({"runbook": rb}, when.timestamp())
            for rb, when in sorted(stored.last_success.items())])
    family("maintenancebot_schedule_fires_total", "counter",
           "Scheduled fires by decision (started, late, skipped, missed, failed).",
           [({"runbook": rb, "decision": d}, n) for (rb, d), n in sorted(stored.decisions.items())])
    family("maintenancebot_llm_tokens_total", "counter", "LLM tokens spent on summaries.",
           [({}, stored.llm_tokens)])
    family("maintenancebot_approvals_pending", "gauge",
           "Hosts parked on an approval request that nobody has answered yet.",
           [({"runbook": rb}, n) for rb, n in sorted(stored.approvals_pending.items())])
    if live is None:
        return "\n".join(out) + "\n"
    family("maintenancebot_runs_in_progress", "gauge", "Runs of this daemon in flight.",
           [({"runbook": rb}, 1) for rb in live.running])
    family("maintenancebot_next_fire_timestamp_seconds", "gauge",
           "The next scheduled fire of each runbook (Unix time).",
           [({"runbook": rb}, when.timestamp()) for rb, when in sorted(live.next_fires.items())
            if when is not None])
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    """Exact: `%g` would round a Unix timestamp to six digits."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ThreadedServer:
    """An HTTP server on a thread of its own until `close()`: the daemon's two endpoints."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 name: str, serves: str) -> None:
        self._server = ThreadingHTTPServer(address, handler)
        self._server.daemon_threads = True
        self._serves = serves
        # A short poll interval: close() returns promptly when the daemon stops.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        log.info("%s on http://%s:%d", self._serves, *self.address)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class StatusServer(ThreadedServer):
    """Serves /healthz and /metrics on a thread until `close()`."""

    def __init__(self, address: tuple[str, int], health: Health,
                 metrics: Callable[[], str]) -> None:
        super().__init__(address, _handler(health, metrics), name="http",
                         serves="health and metrics (/healthz, /metrics)")


def _handler(health: Health, metrics: Callable[[], str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, details = health()
                self._send(200 if ok else 503, "application/json",
                           json.dumps(details, default=str) + "\n")
            elif path == "/metrics":
                try:
                    body = metrics()
                except Exception as exc:  # a scrape must not take the daemon down
                    log.exception("rendering /metrics failed")
                    self._send(500, "text/plain", f"metrics failed: {exc}\n")
                    return
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", body)
            else:
                self._send(404, "text/plain", "not found: try /healthz or /metrics\n")

        def _send(self, code: int, kind: str, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
