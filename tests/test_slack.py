"""Slack with the real `slack_sdk` client against a local server standing in for the Web API.

One message per run with its details in the thread, Retry-After honoured, 5xx past the retries
reported as NotifyError (so the run is marked notify_failed) and a later resend working, Slack's
limits respected, DRY RUN on every message, and no planted secret in any byte sent or logged.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from typing import Any

import pytest

from maintenancebot.digest import build_digest
from maintenancebot.models import Settings, SlackSettings
from maintenancebot.notify import (
    NotifyError,
    RunMessage,
    notifiers_from_settings,
    notify_all,
    run_message,
)
from maintenancebot.notify.console import ConsoleNotifier
from maintenancebot.notify.slack import SlackNotifier
from maintenancebot.redact import RedactingFilter, Redactor
from maintenancebot.summary import deterministic_summary
from tests.httpfakes import FakeServer, Recorded, Reply, fake_server, slack_ok
from tests.rundocs import fleet_doc, host, step

BOT_TOKEN = "xoxb-111111111111-2222222222222-AbCdEfGhIjKlMnOpQrStUvWx"


def message_for(count: int = 50, *, dry_run: bool = False,
                redact: Redactor | None = None, doc: dict[str, Any] | None = None) -> RunMessage:
    redact = redact or Redactor()
    digest = build_digest(doc or fleet_doc(count, dry_run=dry_run), redact)
    return run_message(digest, deterministic_summary(digest), redact)


def slack_at(server: FakeServer, *, retries: int = 2) -> SlackNotifier:
    settings = SlackSettings(channel="#maintenance", base_url=server.url + "api/")
    return SlackNotifier(settings, BOT_TOKEN, None, timeout=5, retries=retries, backoff=0.01)


def assert_within_slack_limits(payload: dict[str, Any]) -> None:
    blocks = payload["blocks"]
    assert len(blocks) <= 50
    assert len(payload["text"]) <= 40_000
    for block in blocks:
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= 3000
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= 150


def test_one_message_per_run_and_the_details_in_its_thread() -> None:
    with fake_server([slack_ok(ts="1700000000.000100")]) as server:
        slack_at(server).send(message_for())
    first, reply = (request.json() for request in server.requests)
    assert [r.path for r in server.requests] == ["/api/chat.postMessage"] * 2
    assert first["channel"] == "#maintenance" and "thread_ts" not in first
    assert first["blocks"][0]["type"] == "header"
    assert "weekly-maintenance: failed" in first["blocks"][0]["text"]["text"]
    assert "Failed: 2 hosts: web-0001, web-0026" in json.dumps(first["blocks"])
    assert reply["thread_ts"] == "1700000000.000100" and reply["channel"] == "C0MAINT"
    assert "Address already in use" in json.dumps(reply["blocks"])
    for payload in (first, reply):
        assert_within_slack_limits(payload)
    assert server.requests[0].headers["Authorization"] == f"Bearer {BOT_TOKEN}"


def test_every_message_of_a_dry_run_says_so() -> None:
    with fake_server([slack_ok()]) as server:
        slack_at(server).send(message_for(5, dry_run=True))
    for request in server.requests:
        payload = request.json()
        assert payload["text"].startswith("DRY RUN")
        assert "DRY RUN" in json.dumps(payload["blocks"][0])


def test_huge_summaries_are_cut_to_slack_limits() -> None:
    message = message_for()
    huge = RunMessage(**{**message.__dict__, "summary": ("word " * 30 + "\n") * 4000,
                         "details": "x" * 200_000, "headline": "h" * 500})
    with fake_server([slack_ok()]) as server:
        slack_at(server).send(huge)
    for request in server.requests:
        assert_within_slack_limits(request.json())
    assert "more blocks cut" in request.json()["blocks"][-1]["text"]["text"]


def test_a_rate_limit_is_retried_after_the_time_slack_asks_for() -> None:
    replies = [Reply(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"}), slack_ok()]
    with fake_server(replies) as server:
        slack_at(server).send(message_for(5))
    first, retried = server.requests[:2]
    gap = retried.at - first.at
    print(f"gap after 429 with Retry-After: 1 -> {gap:.2f}s")
    assert gap >= 0.95
    assert len(server.requests) == 3  # the retried message, then the thread reply


def test_server_errors_past_the_retries_raise_notify_error_and_a_resend_works() -> None:
    healthy = False

    def responder(request: Recorded) -> Reply:
        return slack_ok() if healthy else Reply(500, "upstream broke")

    message = message_for(5)
    with fake_server(responder=responder) as server:
        notifier = slack_at(server, retries=2)
        with pytest.raises(NotifyError, match="HTTP 500"):
            notifier.send(message)
        assert len(server.requests) == 3  # the first try and two retries
        assert notify_all([notifier], message) == ["slack"]  # the caller marks notify_failed
        healthy = True
        server.requests.clear()
        assert notify_all([notifier], message) == []  # what `maintenancebot notify RUN_ID` does
        assert len(server.requests) == 2


def test_an_api_error_names_slacks_error_code() -> None:
    with (fake_server([Reply(200, {"ok": False, "error": "channel_not_found"})]) as server,
          pytest.raises(NotifyError, match="channel_not_found")):
        slack_at(server).send(message_for(5))


def test_an_incoming_webhook_gets_one_message_with_the_details() -> None:
    with fake_server([Reply(200, "ok")]) as server:
        hook = SlackNotifier(SlackSettings(), None, server.url + "services/T1/B2/secretpath")
        hook.send(message_for(5, dry_run=True))
    (request,) = server.requests
    payload = request.json()
    assert_within_slack_limits(payload)
    assert payload["text"].startswith("DRY RUN")
    assert "Address already in use" in json.dumps(payload["blocks"])


def test_a_failing_webhook_raises_notify_error_without_its_url() -> None:
    with fake_server([Reply(404, "no_service")]) as server:
        hook = SlackNotifier(SlackSettings(), None, server.url + "services/T1/B2/secretpath",
                             retries=0)
        with pytest.raises(NotifyError) as raised:
            hook.send(message_for(5))
    assert "secretpath" not in str(raised.value) and "404" in str(raised.value)


def test_mentions_in_server_output_are_escaped_not_pinged() -> None:
    doc = {**fleet_doc(2), "hosts": [host("h1", "failed", [
        step(0, "Deploy", "failed", rc=1, stderr_tail="<!channel> please look <@U123>")])]}
    with fake_server([slack_ok()]) as server:
        slack_at(server).send(message_for(doc=doc))
    assert b"<!channel>" not in server.all_bytes() and b"<@U123>" not in server.all_bytes()
    assert "&lt;!channel&gt;" in server.requests[1].json()["blocks"][0]["text"]["text"]


def test_planted_secrets_never_reach_slack_or_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    db_password, ssh_pass = "pl4nted-Db-Pass!", "hunter2hunter2"
    redact = Redactor([db_password, BOT_TOKEN])
    doc = {**fleet_doc(3), "reason": f"stopped: password={ssh_pass}"}
    doc["hosts"].append(host("db-01", "failed", [step(
        0, "Backup", "failed", rc=2, error=f"pg_dump: FATAL password {db_password}",
        stderr_tail=f"Authorization: Bearer {BOT_TOKEN}\ndsn postgres://u:{ssh_pass}@db/x")]))
    caplog.handler.addFilter(RedactingFilter(redact))
    with caplog.at_level(logging.DEBUG), fake_server([slack_ok()]) as server:
        slack_at(server).send(message_for(doc=doc, redact=redact))
    bodies = b"".join(request.body for request in server.requests)
    for secret in (db_password, ssh_pass):
        assert secret.encode() not in server.all_bytes()
        assert secret not in caplog.text
    assert BOT_TOKEN.encode() not in bodies  # it travels only in the Authorization header
    assert BOT_TOKEN not in caplog.text  # slack_sdk logs every payload at DEBUG
    assert "[REDACTED]" in caplog.text


def test_the_console_notifier_prints_the_same_summary() -> None:
    stream = io.StringIO()
    message = message_for(5, dry_run=True)
    assert notify_all([ConsoleNotifier(stream)], message) == []
    assert stream.getvalue() == message.summary
    assert stream.getvalue().startswith("DRY RUN")


def test_importing_the_notifiers_does_not_import_slack_sdk() -> None:
    code = ("import sys, maintenancebot.notify, maintenancebot.notify.console; "
            "print('slack_sdk' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_notifiers_come_from_settings_and_the_environment() -> None:
    settings = Settings(slack=SlackSettings(token_env="BOT", channel="#ops"))
    stream = io.StringIO()
    names = [n.name for n in notifiers_from_settings(settings, {"BOT": BOT_TOKEN}, stream)]
    assert names == ["console", "slack"]
    assert [n.name for n in notifiers_from_settings(settings, {}, stream)] == ["console"]
    with pytest.raises(NotifyError, match=r"slack\.channel is not set"):
        notifiers_from_settings(Settings(slack=SlackSettings(token_env="BOT")),
                                {"BOT": BOT_TOKEN})
