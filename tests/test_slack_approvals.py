"""Approvals in Slack with the real `slack_sdk`: the request message, its reminder and its
outcome against a local stand-in for the Web API; the daemon's interactivity endpoint fed the
same signed form posts Slack sends; and Socket Mode against a local WebSocket server.

Requests are opened straight in a real store (no SSH): what is tested here is Slack's side.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import pytest
from websockets.sync.server import ServerConnection, serve

from maintenancebot import app
from maintenancebot.daemon import Daemon
from maintenancebot.engine import RunOutcome
from maintenancebot.models import Approvers, Settings, SlackSettings
from maintenancebot.notify.slack_actions import SlackInbound, SlackSetupError
from maintenancebot.notify.slack_approvals import SlackApprovals
from maintenancebot.prepare import prepare
from maintenancebot.redact import Redactor
from maintenancebot.states import RunStatus
from maintenancebot.store import RunStore
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench
from tests.httpfakes import FakeServer, Recorded, Reply, fake_server, slack_ok
from tests.test_approvals import fresh_roots, gated

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


# ------------------------------------------------------------------------------ the endpoint


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


@dataclass
class Endpoint:
    desk: Desk
    slack: FakeServer
    inbound: SlackInbound

    @property
    def address(self) -> tuple[str, int]:
        address = self.inbound.http_address
        assert address is not None
        return address

    def click(self, user: str = APPROVER, action: str = "approve",
              **sign: Any) -> tuple[int, str]:
        payload = click_payload(self.desk.request, user, self.slack.url + "actions/T1/1/hook",
                                action)
        return post(self.address, *signed(payload, **sign))

    def refusals(self, action: str = "slack.refused") -> list[dict[str, Any]]:
        return [r.details for r in self.desk.store.audit_log() if r.action == action]

    def wait_for_slack(self, count: int) -> list[Recorded]:
        deadline = time.monotonic() + 10
        while len(self.slack.requests) < count and time.monotonic() < deadline:
            time.sleep(0.02)  # the note follows the acknowledgement, on the handler's thread
        return self.slack.requests


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    with fake_server([slack_ok()]) as slack:
        desk = open_request(tmp_path, slack, interactivity_listen="127.0.0.1:0")
        inbound = SlackInbound.start(desk.settings, desk.store, environ={
            "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_BOT_TOKEN": BOT_TOKEN})
        assert inbound is not None
        try:
            yield Endpoint(desk, slack, inbound)
        finally:
            inbound.close()
            desk.store.close()


def test_a_signed_click_from_an_approver_records_the_answer(endpoint: Endpoint) -> None:
    assert endpoint.click() == (200, "ok\n")
    record = endpoint.desk.store.get_approval(endpoint.desk.request)
    assert record.status == "closed"
    for host in record.hosts:
        assert (host.decision, host.decided_by, host.channel) == ("approved", APPROVER, "slack")
    assert [(v.voter, v.channel, v.vote) for v in record.votes] == [
        (APPROVER, "slack", "approve")] * 2
    (note,) = endpoint.wait_for_slack(1)
    assert note.path == "/api/chat.postMessage"
    assert note.json()["thread_ts"] == MESSAGE_TS
    assert f"<@{APPROVER}> approved request {endpoint.desk.request}" in note.json()["text"]
    assert not endpoint.refusals()


def test_a_deny_click_denies_every_waiting_host(endpoint: Endpoint) -> None:
    assert endpoint.click(action="deny")[0] == 200
    record = endpoint.desk.store.get_approval(endpoint.desk.request)
    assert {h.decision for h in record.hosts} == {"denied"}


def test_a_forged_signature_is_refused_and_recorded(endpoint: Endpoint) -> None:
    status, body = endpoint.click(secret="not-the-signing-secret")
    assert (status, body) == (401, "refused: bad signature\n")
    assert [r["reason"] for r in endpoint.refusals()] == ["bad signature"]
    assert endpoint.desk.store.get_approval(endpoint.desk.request).votes == ()


def test_a_stale_timestamp_is_refused_and_recorded(endpoint: Endpoint) -> None:
    status, body = endpoint.click(stamp=int(time.time()) - 6 * 60)
    assert status == 401 and "stale timestamp" in body
    (refusal,) = endpoint.refusals()
    assert refusal["reason"].startswith("stale timestamp") and refusal["via"] == "http"
    assert endpoint.desk.store.get_approval(endpoint.desk.request).votes == ()


def test_a_replayed_delivery_is_refused_and_recorded(endpoint: Endpoint) -> None:
    body, headers = signed(click_payload(endpoint.desk.request, APPROVER,
                                         endpoint.slack.url + "actions/T1/1/hook", "deny"))
    assert post(endpoint.address, body, headers)[0] == 200
    assert post(endpoint.address, body, headers) == (
        409, "refused: replay: this signed delivery was seen before\n")
    assert [r["reason"] for r in endpoint.refusals()] == [
        "replay: this signed delivery was seen before"]
    assert len(endpoint.desk.store.get_approval(endpoint.desk.request).votes) == 2  # 1 click


def test_an_unsigned_post_is_refused_and_recorded(endpoint: Endpoint) -> None:
    body, _ = signed(click_payload(endpoint.desk.request, APPROVER, "http://127.0.0.1:9/"))
    assert post(endpoint.address, body, {})[0] == 401
    assert "unsigned" in endpoint.refusals()[0]["reason"]


def test_a_click_from_someone_not_an_approver_is_refused_and_recorded(
        endpoint: Endpoint) -> None:
    assert endpoint.click(user=STRANGER) == (200, "refused\n")
    record = endpoint.desk.store.get_approval(endpoint.desk.request)
    assert record.status == "open" and record.votes == ()
    (refusal,) = endpoint.refusals("approval.refused")
    assert refusal["channel"] == "slack" and "not an approver" in refusal["why"]
    (reply,) = endpoint.wait_for_slack(1)  # told privately, through the response_url
    assert reply.path == "/actions/T1/1/hook"
    assert reply.json()["response_type"] == "ephemeral"
    assert reply.json()["replace_original"] is False
    assert "not an approver" in reply.json()["text"]


def test_a_click_on_a_closed_request_keeps_the_first_answer(endpoint: Endpoint) -> None:
    assert endpoint.click(action="deny")[0] == 200
    assert endpoint.click(user=OTHER_APPROVER) == (200, "refused\n")
    record = endpoint.desk.store.get_approval(endpoint.desk.request)
    assert {(h.decision, h.decided_by) for h in record.hosts} == {("denied", APPROVER)}
    (refusal,) = endpoint.refusals("approval.refused")
    assert "already closed" in refusal["why"]
    requests = endpoint.wait_for_slack(2)
    assert "already closed" in requests[1].json()["text"]


def test_no_secret_reaches_the_log_or_the_store(endpoint: Endpoint,
                                               caplog: pytest.LogCaptureFixture) -> None:
    endpoint.click(secret="forged")
    endpoint.click()
    endpoint.wait_for_slack(1)
    database = (Path(endpoint.desk.settings.state_dir) / "maintenancebot.db").read_bytes()
    for secret in (SIGNING_SECRET, BOT_TOKEN):
        assert secret not in caplog.text
        assert secret.encode() not in database
        assert secret.encode() not in endpoint.slack.all_bytes().replace(
            f"Bearer {BOT_TOKEN}".encode(), b"")


def test_the_endpoint_needs_the_signing_secret(tmp_path: Path) -> None:
    desk = open_request(tmp_path, interactivity_listen="127.0.0.1:0")
    with pytest.raises(SlackSetupError, match="SLACK_SIGNING_SECRET"):
        SlackInbound.start(desk.settings, desk.store, environ={"SLACK_BOT_TOKEN": BOT_TOKEN})
    desk.store.close()


def test_the_daemon_serves_the_endpoint_while_it_runs(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    (tmp_path / "runbooks").mkdir()
    with fake_server([Reply(200, "ok")]) as slack:
        desk = open_request(tmp_path, slack,
                            interactivity_listen="127.0.0.1:0")
        desk.store.close()
        settings = desk.settings.model_copy(update={"runbooks": str(tmp_path / "runbooks")})
        daemon = Daemon(settings)
        daemon.start()
        try:
            assert daemon.slack_inbound is not None
            address = daemon.slack_inbound.http_address
            assert address is not None
            payload = click_payload(desk.request, APPROVER, slack.url + "hook")
            assert post(address, *signed(payload)) == (200, "ok\n")
            decisions = {h.decision for h in daemon.store.get_approval(desk.request).hosts}
            assert decisions == {"approved"}
        finally:
            daemon.stop("test")
        assert daemon.slack_inbound is None
        with pytest.raises(OSError):
            post(address, *signed(payload))


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
