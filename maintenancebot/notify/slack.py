"""The Slack notifier: one message per run, details in its thread; or one incoming-webhook post.

The only module that imports slack_sdk: the approval messages, the click endpoint and Socket
Mode (`slack_approvals`, `slack_actions`, `slack_socket`) take the SDK's pieces from here. Retries are the SDK's own retry handlers (rate limits
honouring Retry-After, connection errors, server errors), so there is one retry loop, not two.
Messages are built to Slack's limits (≤ 50 blocks, ≤ 3 000 characters a section, ≤ 150 a header,
≤ 40 000 of fallback text), cut with "…" rather than rejected. Text is escaped for mrkdwn, so a
`<!channel>` in some stderr stays text. Failure after the retries is a NotifyError; what to do
about it (mark the run notify_failed) is the caller's decision.
"""

from __future__ import annotations

import random
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.builtin.client import SocketModeClient
from slack_sdk.socket_mode.client import BaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.webhook import WebhookClient

from maintenancebot.models import SlackSettings
from maintenancebot.notify import DRY, NotifyError, RunMessage

# What the other Slack modules use: the SDK's pieces, re-exported so they need not import it.
__all__ = [
    "BaseSocketModeClient", "SignatureVerifier", "SlackApiError", "SlackClientError",
    "SlackNotifier", "SocketModeClient", "SocketModeRequest", "SocketModeResponse", "WebClient",
    "WebhookClient", "escape", "retry_handlers",
]

MAX_BLOCKS = 50
SECTION_CHARS = 3000
HEADER_CHARS = 150
TEXT_CHARS = 40_000
_STATUS_EMOJI = {"succeeded": ":white_check_mark:", "failed": ":x:", "aborted": ":octagonal_sign:",
                 "interrupted": ":warning:", "running": ":hourglass_flowing_sand:"}

Block = dict[str, Any]


class _ServerErrors(RetryHandler):
    """Retry any 5xx. The SDK's own ServerErrorRetryHandler (only in recent releases) retries
    500 and 503 only, yet a 502 or 504 from a proxy in front of Slack is just as passing."""

    def _can_retry(self, *, state: Any, request: Any, response: Any = None,
                   error: Exception | None = None) -> bool:
        return response is not None and 500 <= response.status_code <= 599


class _ProportionalJitter(Jitter):
    """Up to 100 % extra on each wait. The SDK's RandomJitter adds up to a whole second, which
    would dwarf a short backoff; proportional jitter still keeps many bots from retrying in step."""

    def recalculate(self, duration: float) -> float:
        return duration * (1 + random.random())


class SlackNotifier:
    name = "slack"

    def __init__(self, settings: SlackSettings, token: str | None, webhook_url: str | None, *,
                 timeout: int = 15, retries: int = 3, backoff: float = 0.5) -> None:
        if not token and not webhook_url:
            raise NotifyError(f"Slack needs a bot token (${settings.token_env}) or a webhook URL")
        if token and not settings.channel and not webhook_url:
            raise NotifyError("Slack bot token given but slack.channel is not set")
        handlers = retry_handlers(retries, backoff)
        self._channel = settings.channel
        self._web = (WebClient(token=token, base_url=settings.base_url, timeout=timeout,
                               retry_handlers=handlers) if token and settings.channel else None)
        self._hook = (WebhookClient(webhook_url, timeout=timeout, retry_handlers=handlers)
                      if webhook_url and self._web is None else None)

    def send(self, message: RunMessage) -> None:
        if self._web is not None:
            self._post_with_thread(self._web, message)
        elif self._hook is not None:
            self._post_webhook(self._hook, message)

    def _post_with_thread(self, client: WebClient, message: RunMessage) -> None:
        try:
            first = client.chat_postMessage(channel=str(self._channel), **main_payload(message),
                                            unfurl_links=False, unfurl_media=False)
            client.chat_postMessage(channel=str(first.get("channel") or self._channel),
                                    thread_ts=str(first["ts"]), **thread_payload(message),
                                    unfurl_links=False, unfurl_media=False)
        except (SlackClientError, OSError, ValueError, KeyError) as exc:
            raise NotifyError(f"Slack chat.postMessage failed: {_why(exc)}") from exc

    def _post_webhook(self, client: WebhookClient, message: RunMessage) -> None:
        payload = main_payload(message)
        details = _code_sections(message.details, DRY if message.dry_run else "")
        payload["blocks"] = _capped(payload["blocks"] + [{"type": "divider"}, *details])
        try:
            response = client.send(**payload, unfurl_links=False, unfurl_media=False)
        except (SlackClientError, OSError, ValueError) as exc:
            raise NotifyError(f"Slack webhook failed: {_why(exc)}") from exc
        if response.status_code != 200:
            # The body is Slack's short error code ("invalid_blocks"); the URL is a secret.
            raise NotifyError(f"Slack webhook answered HTTP {response.status_code}: "
                              f"{str(response.body)[:100]}")


def retry_handlers(retries: int, backoff: float) -> list[RetryHandler]:
    """Rate limits (Retry-After), connection errors and 5xx, `retries` times at most in all."""
    interval = BackoffRetryIntervalCalculator(backoff_factor=backoff, jitter=_ProportionalJitter())
    return [RateLimitErrorRetryHandler(max_retry_count=retries),
            ConnectionErrorRetryHandler(max_retry_count=retries, interval_calculator=interval),
            _ServerErrors(max_retry_count=retries, interval_calculator=interval)]


def main_payload(message: RunMessage) -> dict[str, Any]:
    """The per-run message: status header, the summary, and a context line."""
    emoji = _STATUS_EMOJI.get(message.status, ":grey_question:")
    label = f"{DRY} · " if message.dry_run and DRY not in message.headline else ""
    header = {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                          "text": _cut(f"{emoji} {label}{message.headline}",
                                                       HEADER_CHARS)}}
    context = {"type": "context", "elements": [{"type": "mrkdwn", "text": escape(
        f"run {message.run_id} · {message.runbook} · {message.status}"
        + (f" · {DRY}: nothing was changed" if message.dry_run else ""))}]}
    # The header shows the headline already; the section starts with what follows it.
    body = "\n".join(line for line in message.summary.splitlines() if line != message.headline)
    sections = [_section(chunk) for chunk in _chunks(escape(body.strip()), SECTION_CHARS)]
    text = message.summary if message.summary.startswith(DRY) or not message.dry_run \
        else f"{DRY}: {message.summary}"
    return {"text": _cut(escape(text), TEXT_CHARS),
            "blocks": _capped([header, *sections, context])}


def thread_payload(message: RunMessage) -> dict[str, Any]:
    """The thread reply: per-host outcomes, failures with stderr tails, what changed."""
    prefix = DRY if message.dry_run else ""
    text = f"{prefix + ' · ' if prefix else ''}Details of run {message.run_id}\n{message.details}"
    return {"text": _cut(escape(text), TEXT_CHARS),
            "blocks": _capped(_code_sections(message.details, prefix))}


def escape(text: str) -> str:
    """Slack mrkdwn control characters; everything else is shown as is."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _code_sections(details: str, prefix: str) -> list[Block]:
    fence = "```"
    body = (f"{prefix}\n" if prefix and not details.startswith(prefix) else "") + details
    room = SECTION_CHARS - 2 * len(fence) - 2
    return [_section(f"{fence}\n{chunk}{fence}") for chunk in _chunks(escape(body), room)]


def _chunks(text: str, size: int) -> list[str]:
    """`text` in pieces of at most `size`, split between lines where a line allows it."""
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        for piece in (line[start:start + size] for start in range(0, len(line), size)):
            if len(current) + len(piece) > size:
                chunks.append(current)
                current = ""
            current += piece
    chunks.append(current)
    return [chunk for chunk in chunks if chunk.strip()]


def _capped(blocks: list[Block]) -> list[Block]:
    if len(blocks) <= MAX_BLOCKS:
        return blocks
    kept = blocks[: MAX_BLOCKS - 1]
    return [*kept, _section(f"… {len(blocks) - len(kept)} more blocks cut (Slack allows "
                            f"{MAX_BLOCKS}); `maintenancebot show RUN_ID` has everything")]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _why(exc: BaseException) -> str:
    """Slack's error code and HTTP status, or the error's class; never the token or the URL."""
    if isinstance(exc, SlackApiError):
        response = exc.response
        code = response.get("error") if isinstance(response.data, dict) else None
        return f"HTTP {response.status_code}" + (f" {code}" if code else "")
    return f"{type(exc).__name__}: {exc}"[:200]
