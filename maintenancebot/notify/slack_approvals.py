"""Approval requests in Slack: the request with Approve / Deny buttons, the reminder in its
thread, and the outcome written over it (buttons gone) once every host is decided.

An `ApprovalNotifier` (see `approvals`), called by the process that runs the run. Clicks come
back through `slack_actions` (the daemon's endpoint, or Socket Mode), which only records the
answer and acknowledges it: the final edit of the message is `closed`'s alone, so the two never
race to write the same message. Every piece of text goes through the run's redactor before it
is escaped for mrkdwn (escaping first would hide a secret containing `&` or `<` from it).
Failures raise NotifyError; `approvals.Fanout` logs them and the gate goes on regardless.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maintenancebot.notify import NotifyError
from maintenancebot.notify.slack import (
    HEADER_CHARS,
    MAX_BLOCKS,
    SECTION_CHARS,
    SlackClientError,
    WebClient,
    _cut,
    _section,
    _why,
    escape,
    retry_handlers,
)
from maintenancebot.store_approvals import APPROVED, DENIED, ApprovalHost, ApprovalRecord

if TYPE_CHECKING:
    from maintenancebot.models import Settings
    from maintenancebot.store import RunStore

log = logging.getLogger(__name__)

Block = dict[str, Any]
APPROVE = "approve"  # action_id of the buttons; the endpoint dispatches on these
DENY = "deny"
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,20}")
_HOST_BLOCKS = MAX_BLOCKS - 8  # room left for the header, rollback, how-to and the buttons
_OUTCOME_EMOJI = {APPROVED: ":white_check_mark:", DENIED: ":no_entry:",
                  "expired": ":hourglass:", "cancelled": ":octagonal_sign:",
                  "superseded": ":arrows_counterclockwise:"}


class SlackApprovals:
    """Posts, reminds and closes approval requests in one channel with the bot token."""

    def __init__(self, client: WebClient, channel: str | None, redact: Callable[[str], str],
                 save_notice: Callable[[int, dict[str, Any]], None]) -> None:
        self._client = client
        self._channel = channel
        self._redact = redact
        self._save_notice = save_notice

    @classmethod
    def from_settings(cls, settings: Settings, redact: Callable[[str], str], *,
                      store: RunStore | None = None, environ: Mapping[str, str] | None = None,
                      retries: int = 3, backoff: float = 0.5) -> SlackApprovals:
        slack = settings.slack
        assert slack is not None, "only called when Slack is configured"
        env = os.environ if environ is None else environ
        client = WebClient(token=env.get(slack.token_env), base_url=slack.base_url, timeout=15,
                           retry_handlers=retry_handlers(retries, backoff))
        if not slack.channel:
            log.warning("slack.channel is not set: approval requests are not posted to Slack")
        return cls(client, slack.channel, redact, _notice_saver(settings, store))

    # ------------------------------------------------------------------------------ notices

    def opened(self, request: ApprovalRecord) -> None:
        if not self._channel:
            return
        payload = self.request_payload(request)
        answer = self._call("chat.postMessage", self._client.chat_postMessage,
                            channel=self._channel, **payload, unfurl_links=False,
                            unfurl_media=False)
        notice = {"channel": str(answer.get("channel") or self._channel), "ts": str(answer["ts"])}
        self._save_notice(request.id, notice)
        log.info("approval %d posted to Slack (%s)", request.id, notice["channel"])

    def reminder(self, request: ApprovalRecord) -> None:
        channel, ts = self._where(request)
        if channel is None:
            return
        text = self._text(
            f"Reminder: approval {request.id} ({request.step_name}) still waits for "
            f"{', '.join(request.waiting)}. Deadline {_clock(request.deadline)}: no answer by "
            "then counts as *deny*.")
        self._call("chat.postMessage", self._client.chat_postMessage, channel=channel,
                   thread_ts=ts, text=text, reply_broadcast=True, unfurl_links=False)

    def closed(self, request: ApprovalRecord) -> None:
        channel, ts = self._where(request)
        if channel is None:
            return
        payload = self.closed_payload(request)
        if ts is None:  # the request was never posted (Slack was down): say how it ended
            self._call("chat.postMessage", self._client.chat_postMessage, channel=channel,
                       **payload)
            return
        self._call("chat.update", self._client.chat_update, channel=channel, ts=ts, **payload)

    # ------------------------------------------------------------------------------ payloads

    def request_payload(self, request: ApprovalRecord) -> dict[str, Any]:
        """The open request: what would run where and why, and the buttons."""
        quorum = (f"{request.quorum} approvers needed" if request.quorum > 1
                  else "1 approver needed")
        facts = self._text(
            f"*Run* `{request.run_id}` · *step* {request.step_index + 1} `{request.step_name}` · "
            f"{quorum}\n*Deadline* {_clock(request.deadline)}: no answer by then counts as "
            f"*deny* (on deny: {request.on_deny})")
        blocks = [self._header(f":raised_hand: Approval needed: {request.runbook} · "
                               f"{request.step_name}"), _section(facts),
                  *self._host_blocks(request, closed=False), self._rollback(request),
                  _context(self._text(
                      f"Also from the CLI: `maintenancebot approve {request.id}` "
                      f"[--host H ...] · `maintenancebot deny {request.id} --reason ...` · "
                      f"approval {request.id}, run {request.run_id}")),
                  _buttons(request.id)]
        text = self._text(f"Approval {request.id} needed: {request.runbook} step "
                          f"{request.step_name} on {', '.join(h.host for h in request.hosts)}")
        return {"text": _cut(text, 3000), "blocks": blocks}

    def closed_payload(self, request: ApprovalRecord) -> dict[str, Any]:
        """The outcome per host and who answered; no buttons any more."""
        decisions = {str(h.decision) for h in request.hosts}
        emoji = _OUTCOME_EMOJI.get(decisions.pop(), ":ballot_box_with_check:") \
            if len(decisions) == 1 else ":ballot_box_with_check:"
        blocks = [self._header(f"{emoji} Approval answered: {request.runbook} · "
                               f"{request.step_name}"),
                  _section(self._text(f"*Run* `{request.run_id}` · *step* "
                                      f"{request.step_index + 1} `{request.step_name}`")),
                  *self._host_blocks(request, closed=True), self._rollback(request),
                  _context(self._text(f"approval {request.id} closed "
                                      f"{_clock(request.closed_at or datetime.now(UTC))}"))]
        outcome = "; ".join(f"{h.host} {h.decision}" for h in request.hosts)
        return {"text": _cut(self._text(f"Approval {request.id} answered: {outcome}"), 3000),
                "blocks": blocks}

    def _host_blocks(self, request: ApprovalRecord, *, closed: bool) -> list[Block]:
        entries = [_host_text(h, closed, self._text) for h in request.hosts]
        blocks: list[Block] = []
        current = ""
        for entry in entries:
            entry = _cut(entry, SECTION_CHARS)
            if current and len(current) + len(entry) + 1 > SECTION_CHARS:
                blocks.append(_section(current))
                current = ""
            current = f"{current}\n{entry}" if current else entry
        if current:
            blocks.append(_section(current))
        if len(blocks) > _HOST_BLOCKS:
            shown = blocks[: _HOST_BLOCKS - 1]
            shown.append(_section(f"… more hosts: `maintenancebot approvals` lists all "
                                  f"{len(request.hosts)}"))
            return shown
        return blocks

    def _rollback(self, request: ApprovalRecord) -> Block:
        if not request.rollback:
            return _section("*Rollback:* none (this step has no `rollback`)")
        return _section(_cut(self._text(f"*Rollback:* ```{request.rollback}```"), SECTION_CHARS))

    def _header(self, text: str) -> Block:
        return {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                            "text": _cut(self._redact(text), HEADER_CHARS)}}

    def _text(self, raw: str) -> str:
        """Redact first, then escape (see the module docstring)."""
        return escape(self._redact(raw))

    def _where(self, request: ApprovalRecord) -> tuple[str | None, str | None]:
        channel = request.notice.get("channel") or self._channel
        return (str(channel) if channel else None,
                str(request.notice["ts"]) if request.notice.get("ts") else None)

    def _call(self, name: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except (SlackClientError, OSError, ValueError, KeyError) as exc:
            # The caller (approvals.Fanout) logs this with the request id; the token never
            # appears: _why gives Slack's error code and the HTTP status only.
            raise NotifyError(f"Slack {name} failed: {_why(exc)}") from exc


def _host_text(host: ApprovalHost, closed: bool, text: Callable[[str], str]) -> str:
    """One host's lines; `text` redacts and escapes every piece that came from elsewhere."""
    first = f"*{text(host.host)}*"
    if closed:
        by = f" by {_who(host, text)}" if host.decision in (APPROVED, DENIED) else ""
        reason = f": {text(host.reason)}" if host.reason and host.decision != APPROVED else ""
        first += f"  {_OUTCOME_EMOJI.get(str(host.decision), '')} {host.decision}{by}{reason}"
    lines = [first]
    if host.command:
        lines.append(f"```{text(_cut(host.command, 1200))}```")
    if host.why and not closed:
        why = ", ".join(f"{name} = {json.dumps(value, default=str)}"
                        for name, value in host.why.items())
        lines.append(f"why: {text(_cut(why, 600))}")
    preview = (host.preview or {}).get("summary")
    if preview and not closed:
        lines.append(f"would do: {text(_cut(str(preview), 600))}")
    return "\n".join(lines)


def _who(host: ApprovalHost, text: Callable[[str], str]) -> str:
    """A Slack user id becomes a mention; it is built after escaping, which would break it."""
    voter = host.decided_by or "?"
    if host.channel == "slack" and _USER_ID.fullmatch(voter):
        return f"<@{voter}> (Slack)"
    return f"{text(voter)} ({host.channel or '?'})"


def _buttons(request_id: int) -> Block:
    def button(label: str, action: str, style: str, question: str) -> Block:
        return {"type": "button", "action_id": action, "value": str(request_id), "style": style,
                "text": {"type": "plain_text", "text": label},
                "confirm": {"title": {"type": "plain_text", "text": f"{label} request "
                                                                    f"{request_id}?"},
                            "text": {"type": "plain_text", "text": question},
                            "confirm": {"type": "plain_text", "text": label},
                            "deny": {"type": "plain_text", "text": "Back"}}}

    return {"type": "actions", "block_id": f"approval-{request_id}", "elements": [
        button("Approve", APPROVE, "primary", "The step runs on every host still waiting."),
        button("Deny", DENY, "danger", "The step is skipped (or on_deny applies) on every "
                                       "host still waiting.")]}


def _context(text: str) -> Block:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(text, 2000)}]}


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _notice_saver(settings: Settings,
                  store: RunStore | None) -> Callable[[int, dict[str, Any]], None]:
    """Where a posted request lives, saved in the store so another process can update it.
    Without the run's store at hand, a short-lived connection to the same database does."""
    if store is not None:
        return store.set_approval_notice

    def save(request: int, notice: dict[str, Any]) -> None:
        from maintenancebot.store import DB_NAME, RunStore

        with RunStore(Path(settings.state_dir).expanduser() / DB_NAME) as own:
            own.set_approval_notice(request, notice)

    return save
