"""The daemon's Slack interactivity endpoint, fed the signed form posts Slack sends for a
button click: answers recorded, forgeries, stale and replayed deliveries refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.daemon import Daemon
from maintenancebot.notify.slack_actions import SlackInbound, SlackSetupError
from tests.httpfakes import FakeServer, Recorded, Reply, fake_server, slack_ok
from tests.slack_desk import (
    APPROVER,
    BOT_TOKEN,
    MESSAGE_TS,
    OTHER_APPROVER,
    SIGNING_SECRET,
    STRANGER,
    Desk,
    click_payload,
    open_request,
    post,
    signed,
)


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


