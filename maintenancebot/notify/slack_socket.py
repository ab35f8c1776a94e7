"""Slack Socket Mode: button clicks over a websocket the daemon opens, so no inbound port.

The websocket is authenticated by the app-level token (no request signatures in this mode);
each envelope is acknowledged at once, then its payload goes to the same `ApprovalClicks` as
the HTTP endpoint. An envelope Slack redelivers (it retries one whose ack it missed) is
acknowledged again but decided only once (`store.first_sight`). The SDK's built-in client
reconnects by itself once connected; the first connection is retried here until it works, so a
daemon started while Slack is unreachable still schedules its runbooks.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from maintenancebot.notify.slack import (
    BaseSocketModeClient,
    SlackClientError,
    SocketModeClient,
    SocketModeRequest,
    SocketModeResponse,
    WebClient,
)

if TYPE_CHECKING:
    from maintenancebot.notify.slack_actions import ApprovalClicks
    from maintenancebot.store import RunStore

log = logging.getLogger(__name__)

RETRY_SECONDS = (1, 2, 5, 10, 30, 60)  # between failed first connections, then every minute


class SocketModeListener:
    def __init__(self, app_token: str, web: WebClient, clicks: ApprovalClicks,
                 store: RunStore) -> None:
        self._clicks = clicks
        self._store = store
        self._closed = threading.Event()
        self._client = SocketModeClient(app_token=app_token, web_client=web,
                                        logger=logging.getLogger(f"{__name__}.sdk"))
        self._client.socket_mode_request_listeners.append(self._on_request)
        self._thread = threading.Thread(target=self._connect, name="slack-socket", daemon=True)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected())

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._client.close()
        self._thread.join(5)

    def _connect(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            try:
                self._client.connect()
                log.info("Slack Socket Mode connected")
                return
            except (SlackClientError, OSError, ValueError, KeyError) as exc:
                wait = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                log.warning("Slack Socket Mode connection failed (%s: %s); retrying in %ds",
                            type(exc).__name__, str(exc)[:200], wait)
                attempt += 1
                self._closed.wait(wait)

    def _on_request(self, client: BaseSocketModeClient, request: SocketModeRequest) -> None:
        # Acknowledge first: Slack shows the clicker an error after 3 s without one.
        client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))
        if request.type != "interactive":
            return
        if not self._store.first_sight(f"slack-socket:{request.envelope_id}"):
            self._clicks.refuse("replay: envelope delivered before", via="socket")
            return
        handled = self._clicks.click(request.payload, via="socket")
        if handled.follow_up is not None:
            handled.follow_up()
