"""Approve / Deny clicks coming back from Slack: the daemon's interactivity endpoint.

Owned here: checking that an HTTP delivery really is Slack's (its signature, its age, that it was
not seen before), turning a `block_actions` payload into `approvals.answer(channel="slack")`,
and telling the clicker what happened. Socket Mode (`slack_socket`) hands its payloads to the
same `ApprovalClicks`, so both ways in decide alike. Not here: who may answer, four eyes and
closed requests (`approvals.answer`, which also audits those refusals), and the final edit of
the request's message (`slack_approvals.closed`, in the process that runs the run — doing it
here too would race it).

Every refusal of a delivery (unsigned, forged, stale, replayed, malformed) is answered with an
HTTP error and audited as `slack.refused` with the reason; the signing secret is read once at
start and never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from maintenancebot.approvals import AnswerRefused, answer
from maintenancebot.daemon_http import ThreadedServer
from maintenancebot.errors import MaintenanceBotError, NotFound
from maintenancebot.models import parse_address
from maintenancebot.notify.slack import (
    SignatureVerifier,
    SlackClientError,
    WebClient,
    WebhookClient,
    _why,
    escape,
    retry_handlers,
)
from maintenancebot.notify.slack_approvals import APPROVE, DENY

if TYPE_CHECKING:
    from maintenancebot.models import Settings
    from maintenancebot.notify.slack_socket import SocketModeListener
    from maintenancebot.store import RunStore
    from maintenancebot.store_approvals import VoteOutcome

log = logging.getLogger(__name__)

ACTIONS_PATH = "/slack/actions"
MAX_AGE = 300          # seconds: Slack's own advice; older deliveries are replays
MAX_BODY = 1 << 20     # a block_actions payload carries the whole message: well below this
FollowUp = Callable[[], None]


class SlackSetupError(MaintenanceBotError):
    """Slack interactivity is configured but cannot be served safely (a secret is missing)."""


@dataclass(frozen=True)
class Handled:
    """What to answer the delivery, and what to do once it is answered."""

    status: int
    body: str
    follow_up: FollowUp | None = None


# ------------------------------------------------------------------------------ clicks


class ApprovalClicks:
    """A `block_actions` payload -> one answer, for the HTTP endpoint and Socket Mode alike."""

    def __init__(self, settings: Settings, store: RunStore, web: WebClient | None) -> None:
        self._settings = settings
        self._store = store
        self._web = web  # with the bot token: thread notes; without: ephemeral replies only

    def click(self, payload: Mapping[str, Any], *, via: str) -> Handled:
        if payload.get("type") != "block_actions":
            return Handled(200, "ignored: not a button click")
        action = next((a for a in payload.get("actions") or ()
                       if a.get("action_id") in (APPROVE, DENY)), None)
        if action is None:
            return Handled(200, "ignored: not an approval button")
        user = str((payload.get("user") or {}).get("id") or "")
        try:
            request_id = int(action.get("value"))
        except (TypeError, ValueError):
            self.refuse("malformed: the button carries no request id", via=via, actor=user)
            return Handled(400, "malformed action")
        approve = action["action_id"] == APPROVE
        try:
            outcome = answer(self._settings, self._store, request_id, approve=approve, by=user,
                             channel="slack")
        except AnswerRefused as exc:  # audited by `answer` as approval.refused
            log.warning("Slack answer to approval %d by %s refused: %s", request_id, user, exc)
            return Handled(200, "refused", self._ephemeral(payload, f":no_entry_sign: {exc}"))
        except NotFound as exc:
            self.refuse(f"unknown approval request {request_id}", via=via, actor=user)
            return Handled(200, "unknown request", self._ephemeral(payload, str(exc)))
        log.info("approval %d: %s by %s from Slack: %s", request_id,
                 "approve" if approve else "deny", user, outcome)
        return Handled(200, "ok", self._note(payload, request_id, user, approve, outcome))

    def refuse(self, reason: str, *, via: str, actor: str | None = None,
               **details: Any) -> None:
        """A delivery that decides nothing: logged and audited, no secret in either."""
        log.warning("Slack delivery refused (%s): %s", via, reason)
        self._store.audit("slack.refused", actor=actor or None,
                          details={"reason": reason, "via": via, **details})

    # what the clicker (and the channel) sees

    def _note(self, payload: Mapping[str, Any], request_id: int, user: str, approve: bool,
              outcome: VoteOutcome) -> FollowUp | None:
        verb = "approved" if approve else "denied"
        parts = []
        if outcome.decided:
            parts.append(f"{':white_check_mark:' if approve else ':no_entry:'} <@{user}> "
                         f"{verb} request {request_id} for {_hosts(outcome.decided)}")
        if outcome.pending:
            parts.append(f":ballot_box_with_check: <@{user}> approved request {request_id} for "
                         f"{_hosts(outcome.pending)}: more approvals are needed (quorum)")
        if outcome.already:
            parts.append("already decided, the first answer stands: " + ", ".join(
                f"{escape(h)} {escape(d)}" for h, d in sorted(outcome.already.items())))
        text = "\n".join(parts) or f"request {request_id}: nothing left to answer"
        channel = (payload.get("channel") or {}).get("id")
        ts = (payload.get("container") or {}).get("message_ts") or \
            (payload.get("message") or {}).get("ts")
        if self._web is None or not channel or not ts:
            return self._ephemeral(payload, text)
        web = self._web

        def post() -> None:
            try:
                web.chat_postMessage(channel=str(channel), thread_ts=str(ts), text=text)
            except (SlackClientError, OSError, ValueError) as exc:
                log.warning("Slack thread note for approval %d failed: %s", request_id,
                            _why(exc))

        return post

    def _ephemeral(self, payload: Mapping[str, Any], text: str) -> FollowUp | None:
        url = payload.get("response_url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            return None

        def post() -> None:
            try:
                WebhookClient(url, timeout=10, retry_handlers=retry_handlers(2, 0.5)).send(
                    text=text, response_type="ephemeral", replace_original=False)
            except (SlackClientError, OSError, ValueError) as exc:
                log.warning("Slack ephemeral reply failed: %s", _why(exc))  # never the URL

        return post


def _hosts(hosts: Mapping[str, str] | list[str]) -> str:
    return ", ".join(escape(h) for h in sorted(hosts))


# ------------------------------------------------------------------------------ HTTP


class SignedDeliveries:
    """Slack's request signing: HMAC-SHA256 of `v0:TIMESTAMP:BODY` with the signing secret."""

    def __init__(self, secret: str, clicks: ApprovalClicks, store: RunStore) -> None:
        self._verifier = SignatureVerifier(secret)
        self._clicks = clicks
        self._store = store

    def handle(self, headers: Mapping[str, str], body: bytes, remote: str) -> Handled:
        try:
            body.decode()
        except UnicodeDecodeError:  # Slack sends UTF-8 form data; the verifier decodes too
            self._clicks.refuse("malformed: the body is not UTF-8", via="http", remote=remote)
            return Handled(400, "refused: malformed body")
        refusal = self._refusal(headers, body)
        if refusal is not None:
            status, reason = refusal
            self._clicks.refuse(reason, via="http", remote=remote)
            return Handled(status, f"refused: {reason}")
        try:
            payload = json.loads(parse_qs(body.decode())["payload"][0])
            if not isinstance(payload, dict):
                raise TypeError("payload is not an object")
        except (KeyError, IndexError, ValueError, TypeError):
            self._clicks.refuse("malformed: no JSON `payload` form field", via="http",
                                remote=remote)
            return Handled(400, "refused: malformed payload")
        return self._clicks.click(payload, via="http")

    def _refusal(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str] | None:
        lower = {k.lower(): v for k, v in headers.items()}
        stamp = lower.get("x-slack-request-timestamp")
        signature = lower.get("x-slack-signature")
        if not stamp or not signature:
            return 401, "unsigned: no X-Slack-Signature / X-Slack-Request-Timestamp"
        if not stamp.isdigit():
            return 401, "bad timestamp"
        if not self._verifier.is_valid(body, stamp, signature):
            # Which of the two checks failed: the signature itself, or only the clock.
            expected = self._verifier.generate_signature(timestamp=stamp, body=body) or ""
            if not hmac.compare_digest(expected, signature):
                return 401, "bad signature"
            return 401, f"stale timestamp ({int(time.time()) - int(stamp)}s old, max {MAX_AGE}s)"
        key = hashlib.sha256(f"{stamp}:{signature}:".encode() + body).hexdigest()
        if not self._store.first_sight(f"slack-http:{key}"):
            return 409, "replay: this signed delivery was seen before"
        return None


class InteractivityServer(ThreadedServer):
    """POST /slack/actions on its own address, on a thread until `close()`.

    Apart from /healthz and /metrics (`--listen`) on purpose: this one is reached from Slack,
    through a reverse proxy with TLS, and nothing else should be exposed with it."""

    def __init__(self, address: tuple[str, int], deliveries: SignedDeliveries) -> None:
        super().__init__(address, _handler(deliveries), name="slack-actions",
                         serves=f"Slack interactivity endpoint ({ACTIONS_PATH})")


def _handler(deliveries: SignedDeliveries) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the name http.server calls
            if self.path.split("?", 1)[0] != ACTIONS_PATH:
                self._send(404, f"not found: Slack posts to {ACTIONS_PATH}\n")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._send(413 if length else 400, "refused: body size\n")
                return
            body = self.rfile.read(length)
            try:
                handled = deliveries.handle(dict(self.headers.items()), body,
                                            self.client_address[0])
            except Exception:  # a bug must answer 500, not leave Slack waiting 3 s
                log.exception("Slack delivery crashed")
                self._send(500, "internal error\n")
                return
            # Slack wants its 200 within 3 s: answer first, then the notes to the clicker.
            self._send(handled.status, handled.body + "\n")
            if handled.follow_up is not None:
                handled.follow_up()

        def do_GET(self) -> None:
            self._send(405, f"Slack posts to {ACTIONS_PATH}\n")

        def _send(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("slack http: " + format, *args)

    return Handler


# ------------------------------------------------------------------------------ the daemon's


class SlackInbound:
    """What the daemon starts when Slack interactivity is configured, and closes on stop."""

    def __init__(self, server: InteractivityServer | None,
                 socket: SocketModeListener | None) -> None:
        self.server = server
        self.socket = socket

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self.server.address if self.server is not None else None

    @classmethod
    def start(cls, settings: Settings, store: RunStore,
              environ: Mapping[str, str] | None = None) -> SlackInbound | None:
        """None when neither `slack.interactivity_listen` nor `slack.socket_mode` is set.
        Raises SlackSetupError when one is set without the secret it needs."""
        slack = settings.slack
        if slack is None or not (slack.interactivity_listen or slack.socket_mode):
            return None
        env = os.environ if environ is None else environ
        token = env.get(slack.token_env) or None
        web = WebClient(token=token, base_url=slack.base_url, timeout=15,
                        retry_handlers=retry_handlers(3, 0.5))
        clicks = ApprovalClicks(settings, store, web if token else None)
        server = socket = None
        if slack.interactivity_listen:
            secret = env.get(slack.signing_secret_env)
            if not secret:
                raise SlackSetupError(
                    f"slack.interactivity_listen is set but ${slack.signing_secret_env} is "
                    "empty: without the signing secret no click can be verified")
            server = InteractivityServer(parse_address(slack.interactivity_listen),
                                         SignedDeliveries(secret, clicks, store))
        if slack.socket_mode:
            app_token = env.get(slack.app_token_env)
            if not app_token:
                raise SlackSetupError(f"slack.socket_mode is on but ${slack.app_token_env} "
                                      "(an app-level token, connections:write) is empty")
            from maintenancebot.notify.slack_socket import SocketModeListener

            socket = SocketModeListener(app_token, web, clicks, store)
        inbound = cls(server, socket)
        if server is not None:
            server.start()
        if socket is not None:
            socket.start()
        return inbound

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.socket is not None:
            self.socket.close()
