"""Approvals in Slack with the real `slack_sdk`: the request message, its reminder and its
outcome against a local stand-in for the Web API; Socket Mode against a local WebSocket server;
and a click that resumes a parked run on real hosts (the HTTP endpoint: test_slack_endpoint).

Requests are opened straight in a real store (no SSH): what is tested here is Slack's side.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Self

import pytest
from websockets.sync.server import ServerConnection, serve

from maintenancebot import app
from maintenancebot.engine import RunOutcome
from maintenancebot.models import Approvers, Settings, SlackSettings
from maintenancebot.notify.slack_actions import SlackInbound, SlackSetupError
from maintenancebot.notify.slack_approvals import SlackApprovals
from maintenancebot.prepare import prepare
from maintenancebot.redact import Redactor
from maintenancebot.states import RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench
from tests.httpfakes import FakeServer, Recorded, Reply, fake_server, slack_ok
from tests.slack_desk import (
    APP_TOKEN,
    APPROVER,
    BOT_TOKEN,
    MESSAGE_TS,
    PLANTED,
    SIGNING_SECRET,
    Desk,
    click_payload,
    post,
    signed,
)
from tests.test_approvals import fresh_roots, gated


def notifier(desk: Desk, server: FakeServer, *, own_store: bool = True) -> SlackApprovals:
    """`own_store=False`: with no store given, the notifier saves the message's place through
    its own connection to the state directory's store (`app.approval_notifiers` gives it one)."""
    settings = desk.settings.model_copy(update={"slack": SlackSettings(
        channel="C0MAINT", base_url=server.url + "api/")})
    return SlackApprovals.from_settings(settings, Redactor([PLANTED]),
                                        store=desk.store if own_store else None,
                                        environ={"SLACK_BOT_TOKEN": BOT_TOKEN}, backoff=0.01)


def all_text(payload: Any) -> str:
    return json.dumps(payload)



# ------------------------------------------------------------------------------ the message


def test_a_request_is_posted_with_its_buttons_and_no_secret(desk: Desk) -> None:
    with fake_server([slack_ok(ts=MESSAGE_TS)]) as server:
        notifier(desk, server, own_store=False).opened(desk.store.get_approval(desk.request))
    (request,) = server.requests
    assert request.path == "/api/chat.postMessage"
    assert request.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    payload = request.json()
    blocks = payload["blocks"]
    assert blocks[0]["type"] == "header"
    assert "weekly" in blocks[0]["text"]["text"] and "reboot" in blocks[0]["text"]["text"]
    (actions,) = [b for b in blocks if b["type"] == "actions"]
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [
        ("approve", str(desk.request)), ("deny", str(desk.request))]
    text = all_text(blocks)
    for shown in ("web-1", "web-2", "systemctl reboot", "flag", "reboots the host",
                  "systemctl start nginx", desk.run_id, f"maintenancebot approve {desk.request}",
                  "counts as *deny*", "[REDACTED]"):
        assert shown in text, shown
    sent = server.all_bytes()
    assert PLANTED.encode() not in sent and b"hunter2222" not in sent
    assert len(blocks) <= 50
    # Where the message is, so that another process can update it.
    assert desk.store.get_approval(desk.request).notice == {"channel": "C0MAINT",
                                                            "ts": MESSAGE_TS}


def test_the_reminder_is_a_thread_reply_saying_that_silence_denies(desk: Desk) -> None:
    desk.store.set_approval_notice(desk.request, {"channel": "C0MAINT", "ts": MESSAGE_TS})
    with fake_server([slack_ok()]) as server:
        notifier(desk, server).reminder(desk.store.get_approval(desk.request))
    (request,) = server.requests
    payload = request.json()
    assert payload["thread_ts"] == MESSAGE_TS and payload["channel"] == "C0MAINT"
    assert "web-1, web-2" in payload["text"] and "counts as *deny*" in payload["text"]


def test_closed_rewrites_the_message_with_who_answered_and_no_buttons(desk: Desk) -> None:
    desk.store.set_approval_notice(desk.request, {"channel": "C0MAINT", "ts": MESSAGE_TS})
    desk.store.cast_vote(desk.request, vote="approve", voter=APPROVER, channel="slack",
                         hosts=["web-1"])
    desk.store.cast_vote(desk.request, vote="deny", voter="alice", channel="cli",
                         hosts=["web-2"], reason="not today")
    record = desk.store.get_approval(desk.request)
    assert record.status == "closed"
    with fake_server([slack_ok()]) as server:
        notifier(desk, server).closed(record)
    (request,) = server.requests
    assert request.path == "/api/chat.update"
    payload = request.json()
    assert payload["ts"] == MESSAGE_TS and payload["channel"] == "C0MAINT"
    assert not [b for b in payload["blocks"] if b["type"] == "actions"]
    text = all_text(payload["blocks"])
    assert f"approved by <@{APPROVER}> (Slack)" in text
    assert "denied by alice (cli): not today" in text
    assert PLANTED.encode() not in server.all_bytes()


def test_a_slack_failure_is_a_notify_error_without_the_token(desk: Desk) -> None:
    from maintenancebot.notify import NotifyError

    with (fake_server([Reply(200, {"ok": False, "error": "channel_not_found"})]) as server,
          pytest.raises(NotifyError, match="channel_not_found") as raised):
        notifier(desk, server).opened(desk.store.get_approval(desk.request))
    assert BOT_TOKEN not in str(raised.value)


# ------------------------------------------------------------------------------ Socket Mode


class SocketSlack:
    """A WebSocket server playing Slack's Socket Mode: hello, then one interactive envelope;
    it records the acknowledgements it gets back."""

    def __init__(self, payload: dict[str, Any], envelopes: int = 1) -> None:
        self.payload = payload
        self.envelopes = envelopes
        self.acks: list[dict[str, Any]] = []
        self.done = threading.Event()
        self._server = serve(self._session, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"ws://{host}:{port}/link/?ticket=test-ticket"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()

    def _session(self, ws: ServerConnection) -> None:
        ws.send(json.dumps({"type": "hello", "num_connections": 1,
                            "connection_info": {"app_id": "A0123"},
                            "debug_info": {"host": "test"}}))
        for _ in range(self.envelopes):  # the same envelope again = Slack's redelivery
            ws.send(json.dumps({"envelope_id": "env-1", "type": "interactive",
                                "accepts_response_payload": False, "payload": self.payload}))
        while len(self.acks) < self.envelopes:
            self.acks.append(json.loads(ws.recv(timeout=10)))
        self.done.set()
        try:
            ws.recv(timeout=30)  # keep the session open until the client closes it
        except Exception:  # noqa: BLE001 - the client hung up: the session is over
            return


def socket_settings(desk: Desk, slack: FakeServer) -> Settings:
    return desk.settings.model_copy(update={"slack": SlackSettings(
        channel="C0MAINT", base_url=slack.url + "api/", socket_mode=True)})


@pytest.mark.parametrize("deliveries", [1, 2])
def test_a_socket_mode_click_is_acknowledged_and_answers_the_request(
        desk: Desk, deliveries: int) -> None:
    hook_url = "http://127.0.0.1:9/unused"
    with SocketSlack(click_payload(desk.request, APPROVER, hook_url),
                     envelopes=deliveries) as ws:

        def web_api(request: Recorded) -> Reply:
            if request.path == "/api/apps.connections.open":
                return Reply(200, {"ok": True, "url": ws.url})
            return slack_ok()

        with fake_server(responder=web_api) as slack:
            inbound = SlackInbound.start(socket_settings(desk, slack), desk.store, environ={
                "SLACK_APP_TOKEN": APP_TOKEN, "SLACK_BOT_TOKEN": BOT_TOKEN})
            assert inbound is not None and inbound.http_address is None
            try:
                assert ws.done.wait(15), "no acknowledgement came back"
                deadline = time.monotonic() + 10
                while len(slack.requests) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                inbound.close()
    assert [a["envelope_id"] for a in ws.acks] == ["env-1"] * deliveries
    opened = slack.requests[0]
    assert opened.path == "/api/apps.connections.open"
    assert opened.headers["Authorization"] == f"Bearer {APP_TOKEN}"
    record = desk.store.get_approval(desk.request)
    assert {(h.decision, h.decided_by, h.channel) for h in record.hosts} == {
        ("approved", APPROVER, "slack")}
    assert len(record.votes) == 2  # decided once, even when Slack delivered it twice
    note = slack.requests[1].json()
    assert note["thread_ts"] == MESSAGE_TS and f"<@{APPROVER}> approved" in note["text"]
    refusals = [r.details["reason"] for r in desk.store.audit_log() if r.action == "slack.refused"]
    assert refusals == ["replay: envelope delivered before"] * (deliveries - 1)


def test_socket_mode_needs_the_app_token(desk: Desk) -> None:
    with fake_server([slack_ok()]) as slack, pytest.raises(SlackSetupError,
                                                           match="SLACK_APP_TOKEN"):
        SlackInbound.start(socket_settings(desk, slack), desk.store, environ={})


# ------------------------------------------------------------------------------ end to end

def with_planted_secret(runbook: str) -> str:
    """test_approvals' gated runbook, whose approval request must show the reboot command with
    a secret inside it: the secret is what Slack must never receive."""
    planted = runbook.replace(
        "hosts: all\n", 'hosts: all\nvars: {db_password: "env:E2E_DB_PASSWORD"}\n', 1).replace(
        "run: touch {{ root }}/rebooted\n",
        "run: touch {{ root }}/rebooted && echo {{ db_password }} > /dev/null\n", 1)
    assert planted.count("db_password") == 2
    return planted


def test_a_click_in_slack_resumes_a_parked_run_on_real_hosts(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("E2E_DB_PASSWORD", PLANTED)
    names = fleet.names
    fresh_roots(fleet)
    (fleet.root(names[0]) / "flag").write_text("yes\n")
    bench = Bench(fleet, tmp_path)
    outcome: list[RunOutcome] = []
    with fake_server([slack_ok(ts=MESSAGE_TS)]) as slack:
        settings = Settings(
            state_dir=str(tmp_path / "state"), ssh=fleet.ssh_settings,
            approvers=Approvers(slack=[APPROVER]),
            slack=SlackSettings(channel="C0MAINT", base_url=slack.url + "api/",
                                interactivity_listen="127.0.0.1:0"))
        runbook = bench.write_runbook(with_planted_secret(gated("5m")))
        plan = prepare(settings, str(runbook), str(bench.inventory), None)
        runner = threading.Thread(target=lambda: outcome.append(app.execute(
            settings, plan, dry_run=False, started_by="alice")))
        runner.start()
        with app.open_store(settings) as store:
            inbound = SlackInbound.start(settings, store, environ={
                "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_BOT_TOKEN": BOT_TOKEN})
            assert inbound is not None and inbound.http_address is not None
            try:
                deadline = time.monotonic() + 60
                while not [r for r in store.list_approvals() if r.notice.get("ts")]:
                    assert time.monotonic() < deadline, "the request was not posted"
                    time.sleep(0.05)
                (request,) = store.list_approvals()
                assert [h.host for h in request.hosts] == [names[0]]
                assert not (fleet.root(names[0]) / "rebooted").exists()
                payload = click_payload(request.id, APPROVER, slack.url + "hook")
                assert post(inbound.http_address, *signed(payload)) == (200, "ok\n")
                runner.join(60)
                assert not runner.is_alive(), "the run did not finish after the click"
            finally:
                inbound.close()
            record = store.get_approval(request.id)
    assert outcome[0].status is RunStatus.SUCCEEDED
    assert (fleet.root(names[0]) / "rebooted").exists()
    for name in names:
        assert (fleet.root(name) / "after").exists()
        assert (fleet.root(name) / "rebooted").exists() == (name == names[0])
    assert (record.status, record.hosts[0].decided_by, record.hosts[0].channel) == (
        "closed", APPROVER, "slack")
    calls = [(r.path, r.json()) for r in slack.requests]
    posted = next(body for path, body in calls if path == "/api/chat.postMessage"
                  and any(b["type"] == "actions" for b in body.get("blocks", [])))
    assert "[REDACTED]" in json.dumps(posted["blocks"])
    (update,) = [body for path, body in calls if path == "/api/chat.update"]
    assert update["ts"] == MESSAGE_TS and not [b for b in update["blocks"]
                                               if b["type"] == "actions"]
    assert f"approved by <@{APPROVER}>" in json.dumps(update["blocks"])
    assert PLANTED.encode() not in slack.all_bytes()
