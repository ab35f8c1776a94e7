"""A Slack approval desk for the Slack tests: an open approval request for two hosts in a
real store, the tokens and secret planted in it, and Slack's signed button clicks."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.models import Approvers, Settings, SlackSettings
from maintenancebot.store import RunStore
from tests.httpfakes import FakeServer

BOT_TOKEN = "xoxb-111111111111-2222222222222-AbCdEfGhIjKlMnOpQrStUvWx"
APP_TOKEN = "xapp-1-A0123-4567-abcdefabcdef0123456789"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
PLANTED = "Pl4nted-Db-Secret-77"  # a known secret value (as an `env:` host var resolves to)
APPROVER, OTHER_APPROVER, STRANGER = "UAPPROVE1", "UAPPROVE2", "USTRANGER"
MESSAGE_TS = "1700000000.000100"



@dataclass
class Desk:
    """A run with one open approval request for two hosts, in a real store."""

    store: RunStore
    settings: Settings
    request: int
    run_id: str


def open_request(tmp: Path, slack: FakeServer | None = None, *, quorum: int = 1,
                 **slack_options: Any) -> Desk:
    settings = Settings(
        state_dir=str(tmp), approvers=Approvers(cli=["alice"], slack=[APPROVER, OTHER_APPROVER]),
        slack=SlackSettings(channel="C0MAINT", base_url=(slack.url if slack else
                                                         "http://127.0.0.1:9/") + "api/",
                            **slack_options))
    store = RunStore(tmp / "maintenancebot.db")  # no redactor: the notifier must mask alone
    run_id = "20261123T090000-abc123"
    store.create_run(run_id, runbook="weekly", runbook_path=None, runbook_hash=None,
                     dry_run=False, started_by="alice", selection=None,
                     hosts=[("web-1", "127.0.0.2"), ("web-2", "127.0.0.3")])
    now = datetime.now(UTC)
    request = store.open_approval(
        run_id=run_id, runbook="weekly", step_index=2, step_name="reboot", quorum=quorum,
        on_deny="skip", started_by="alice", rollback="systemctl start nginx",
        deadline=now + timedelta(hours=1), remind_at=now + timedelta(minutes=45),
        hosts=[{"host": name, "step_row": None, "digest": f"d-{name}",
                "command": f"mysql -p{PLANTED} -e 'flush' && echo password=hunter2222 && "
                           "systemctl reboot",
                "why": {"flag": {"stdout": "yes", "rc": 0}},
                "preview": {"summary": "reboots the host", "data": {}}}
               for name in ("web-1", "web-2")])
    return Desk(store, settings, request, run_id)


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    made = open_request(tmp_path)
    yield made
    made.store.close()



def click_payload(request: int, user: str, response_url: str, action: str = "approve") -> dict[
        str, Any]:
    """A block_actions payload as Slack sends it for a button in a channel message."""
    return {
        "type": "block_actions", "user": {"id": user, "username": "someone", "team_id": "T1"},
        "api_app_id": "A0123", "token": "verification-token-unused",
        "container": {"type": "message", "message_ts": MESSAGE_TS, "channel_id": "C0MAINT",
                      "is_ephemeral": False},
        "trigger_id": "123.456.abc", "team": {"id": "T1", "domain": "example"},
        "enterprise": None, "is_enterprise_install": False,
        "channel": {"id": "C0MAINT", "name": "maintenance"},
        "message": {"type": "message", "ts": MESSAGE_TS, "text": "Approval needed"},
        "state": {"values": {}}, "response_url": response_url,
        "actions": [{"action_id": action, "block_id": f"approval-{request}",
                     "text": {"type": "plain_text", "text": action.title()},
                     "value": str(request), "type": "button", "action_ts": "1700000001.0002"}],
    }


def signed(payload: dict[str, Any], *, secret: str = SIGNING_SECRET,
           stamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = urllib.parse.urlencode({"payload": json.dumps(payload)})
    when = str(int(time.time()) if stamp is None else stamp)
    digest = hmac.new(secret.encode(), f"v0:{when}:{body}".encode(), hashlib.sha256).hexdigest()
    return body.encode(), {"X-Slack-Request-Timestamp": when, "X-Slack-Signature": f"v0={digest}",
                           "Content-Type": "application/x-www-form-urlencoded"}


def post(address: tuple[str, int], body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}/slack/actions",
                                     data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
