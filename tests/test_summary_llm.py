"""Summaries with the real `openai` client against a local OpenAI-compatible server.

Grounding (facts always from the template), budgets (no call past them), retries (429 and 5xx
only), fallbacks (timeouts, malformed answers), and that no planted secret leaves the process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest

from maintenancebot.digest import Digest, build_digest
from maintenancebot.llm import RetryPolicy
from maintenancebot.models import LlmSettings, Settings
from maintenancebot.redact import RedactingFilter, Redactor, secrets_from_settings_and_env
from maintenancebot.summary import (
    MAX_PROMPT_CHARS,
    SYSTEM_PROMPT,
    build_prompt,
    deterministic_summary,
    summarize,
)
from tests.httpfakes import FakeServer, Reply, chat_completion, fake_server
from tests.rundocs import fleet_doc, host, step

LLM_KEY = "sk-test-llm-key-0123456789abcdef"
ENV = {"TEST_LLM_KEY": LLM_KEY}
FAST = RetryPolicy(attempts=3, initial_wait=0.02, max_wait=0.1, jitter=0.02)
NARRATIVE = "Weekly maintenance reached 500 hosts; nginx failed to restart on 20 of them."


class MemoryLedger:
    """The TokenLedger protocol in memory: the store implements it on SQLite."""

    def __init__(self, today: int = 0) -> None:
        self.today = today
        self.per_run: dict[str, int] = {}

    def used_today(self) -> int:
        return self.today

    def used_for_run(self, run_id: str) -> int:
        return self.per_run.get(run_id, 0)

    def record(self, run_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.per_run[run_id] = self.per_run.get(run_id, 0) + prompt_tokens + completion_tokens
        self.today += prompt_tokens + completion_tokens


def llm_at(server: FakeServer, **overrides: Any) -> LlmSettings:
    fields: dict[str, Any] = {"base_url": server.url + "v1", "model": "test-model",
                              "api_key_env": "TEST_LLM_KEY", "timeout": 2.0}
    return LlmSettings(**(fields | overrides))


def digest_of(count: int = 500, failures: bool = True) -> Digest:
    return build_digest(fleet_doc(count, failures=failures), Redactor())


def test_without_an_llm_the_template_is_the_summary() -> None:
    summary = summarize(digest_of(), llm=None, ledger=None, redact=Redactor())
    assert (summary.source, summary.reason, summary.tokens) == ("template", None, 0)
    assert "Failed: 20 hosts: web-0001, web-0026" in summary.text


def test_a_normal_llm_summary_keeps_every_fact_and_records_usage() -> None:
    ledger = MemoryLedger()
    with fake_server([chat_completion(NARRATIVE, 700, 50)]) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=ledger, redact=Redactor(),
                            environ=ENV, retry=FAST)
    assert (summary.source, summary.reason, summary.tokens) == ("llm", None, 750)
    assert ledger.per_run == {"20240601-0300-abcd": 750}
    assert NARRATIVE in summary.text
    assert summary.text.startswith("weekly-maintenance: failed (run 20240601-0300-abcd)")
    for fact in ("Hosts: 500 in all: 460 succeeded, 20 failed, 20 unreachable",
                 "Failed: 20 hosts: web-0001", "Unreachable: 20 hosts: web-0003"):
        assert fact in summary.text
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    body = request.json()
    assert body["model"] == "test-model" and "tools" not in body and "functions" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == SYSTEM_PROMPT


def test_the_llm_cannot_drop_facts_or_ping_the_channel() -> None:
    answer = "All hosts are fine, nothing failed. <!channel> @here see https://evil.example/x"
    with fake_server([chat_completion(answer)]) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=MemoryLedger(),
                            redact=Redactor(), environ=ENV, retry=FAST)
    assert "Failed: 20 hosts: web-0001" in summary.text
    assert "<!channel>" not in summary.text and "@here" not in summary.text
    assert "evil.example" not in summary.text


def test_a_rate_limit_is_retried_and_then_succeeds() -> None:
    replies = [Reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}),
               chat_completion(NARRATIVE)]
    with fake_server(replies) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=MemoryLedger(),
                            redact=Redactor(), environ=ENV, retry=FAST)
    assert len(server.requests) == 2
    assert summary.source == "llm"


def test_server_errors_are_retried_but_auth_errors_are_not() -> None:
    with fake_server([Reply(503, {"error": {"message": "busy"}}),
                      chat_completion(NARRATIVE)]) as server:
        assert summarize(digest_of(), llm=llm_at(server), ledger=None, redact=Redactor(),
                         environ=ENV, retry=FAST).source == "llm"
        assert len(server.requests) == 2
    with fake_server([Reply(401, {"error": {"message": "bad key"}})]) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=None, redact=Redactor(),
                            environ=ENV, retry=FAST)
        assert len(server.requests) == 1
    assert summary.source == "template"
    assert summary.reason == ("LLM summary unavailable: authentication failed, HTTP 401 "
                              "(check the API key variable)")


def test_timeouts_past_the_retries_fall_back_to_the_template() -> None:
    with fake_server([Reply(delay=1.5, body=b"{}")]) as server:
        summary = summarize(digest_of(), llm=llm_at(server, timeout=0.25), ledger=MemoryLedger(),
                            redact=Redactor(), environ=ENV,
                            retry=RetryPolicy(attempts=2, initial_wait=0.02, jitter=0.01))
        assert len(server.requests) == 2
    assert summary.source == "template"
    assert summary.reason == "LLM summary unavailable: timed out (after 2 attempts)"
    assert summary.reason in summary.text
    assert "Failed: 20 hosts" in summary.text


@pytest.mark.parametrize("reply", [
    Reply(200, b"{this is not json", {"Content-Type": "application/json"}),
    Reply(200, {"choices": []}),
    Reply(200, {"choices": [{"message": {"role": "assistant", "content": None}}]}),
], ids=["not-json", "no-choices", "empty-message"])
def test_a_malformed_answer_falls_back_to_the_template(reply: Reply) -> None:
    with fake_server([reply]) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=MemoryLedger(),
                            redact=Redactor(), environ=ENV, retry=FAST)
    assert summary.source == "template"
    assert summary.reason is not None and "malformed response" in summary.reason


@pytest.mark.parametrize(("ledger", "budgets", "why"), [
    (MemoryLedger(today=199_900), {}, "tokens used today"),
    (MemoryLedger(), {"run_token_budget": 100}, "this run has used 0 of 100 tokens"),
], ids=["daily", "per-run"])
def test_past_the_budget_no_call_is_made_and_the_summary_says_why(
        ledger: MemoryLedger, budgets: dict[str, int], why: str) -> None:
    with fake_server([chat_completion(NARRATIVE)]) as server:
        summary = summarize(digest_of(), llm=llm_at(server, **budgets), ledger=ledger,
                            redact=Redactor(), environ=ENV, retry=FAST)
        assert server.requests == []
    assert summary.source == "template"
    assert summary.reason is not None and summary.reason.startswith("LLM budget exhausted")
    assert why in summary.reason and summary.reason in summary.text


def test_a_run_cannot_spend_past_its_budget_by_asking_again() -> None:
    ledger = MemoryLedger()
    with fake_server([chat_completion(NARRATIVE, prompt_tokens=5500)]) as server:
        llm = llm_at(server, run_token_budget=6000)
        first = summarize(digest_of(), llm=llm, ledger=ledger, redact=Redactor(), environ=ENV)
        second = summarize(digest_of(), llm=llm, ledger=ledger, redact=Redactor(), environ=ENV)
        assert len(server.requests) == 1
    assert (first.source, second.source) == ("llm", "template")


def test_a_missing_api_key_falls_back_without_a_call() -> None:
    with fake_server([chat_completion(NARRATIVE)]) as server:
        summary = summarize(digest_of(), llm=llm_at(server), ledger=None, redact=Redactor(),
                            environ={})
        assert server.requests == []
    assert summary.reason == "no LLM summary: $TEST_LLM_KEY is not set"


def test_the_prompt_for_five_hundred_green_hosts_is_under_two_thousand_tokens() -> None:
    with fake_server([chat_completion(NARRATIVE)]) as server:
        summarize(digest_of(500, failures=False), llm=llm_at(server), ledger=None,
                  redact=Redactor(), environ=ENV)
    sent = "".join(m["content"] for m in server.requests[0].json()["messages"])
    print(f"prompt for 500 green hosts: {len(sent)} chars ≈ {len(sent) // 4} tokens")
    assert len(sent) / 4 < 2000


def test_the_prompt_stays_under_its_cap_whatever_the_digest() -> None:
    hosts = [host(f"h{i}", "failed", [step(0, f"Step {i}", "failed", rc=1,
                                           error="E" * 200, stderr_tail="x" * 400)])
             for i in range(300)]
    doc = {"run_id": "r", "runbook": "big", "status": "failed", "dry_run": False,
           "reason": None, "hosts": hosts}
    prompt = build_prompt(build_digest(doc, Redactor()), Redactor(), max_prompt_chars=4000)
    assert len(SYSTEM_PROMPT) + len(prompt) <= 4000 < MAX_PROMPT_CHARS
    assert "more (size cap)" in prompt


def test_planted_secrets_never_reach_the_llm_the_summary_or_the_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    db_password, service_token = "pl4nted-Db-Pass!", "svc-token-5f2a9c81e7"
    aws_key, pem = "AKIAABCDEFGHIJKLMNOP", "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC7"
    environ = {**ENV, "DB_PASSWORD": db_password, "BILLING_API_TOKEN": service_token}
    leaky = host("db-01", "failed", [
        step(0, "Dump database", "failed", rc=1, command=f"pg_dump --password {db_password}",
             error=f"pg_dump: connection failed for password {db_password}",
             stderr_tail=(f"using {service_token}\nkey: {aws_key}\n-----BEGIN PRIVATE KEY-----\n"
                          f"{pem}\n-----END PRIVATE KEY-----\nFATAL: auth failed")),
        step(1, "Notify", details={"count": 1, "packages": [f"x-{service_token}"]}),
    ], error=f"ssh: password {db_password} refused")
    doc = {**fleet_doc(20), "reason": f"aborted by {service_token}"}
    doc["hosts"].append(leaky)
    with fake_server([chat_completion(f"Echoing {db_password} back.")]) as server:
        llm = llm_at(server)
        secrets = secrets_from_settings_and_env(
            Settings(llm=llm), {"db-01": {"db_password": "env:DB_PASSWORD"}}, environ)
        redact = Redactor(secrets)
        caplog.handler.addFilter(RedactingFilter(redact))
        with caplog.at_level(logging.DEBUG):
            summary = summarize(build_digest(doc, redact), llm=llm, ledger=MemoryLedger(),
                                redact=redact, environ=environ, retry=FAST)
            logging.getLogger("maintenancebot.test").info("key was %s", LLM_KEY)
    sent, body = server.all_bytes(), server.requests[0].body
    for secret in (db_password, service_token, aws_key, pem):
        for where in (sent, summary.text.encode(), caplog.text.encode()):
            assert secret.encode() not in where
            assert json.dumps(secret)[1:-1].encode() not in where
    assert LLM_KEY.encode() not in body and LLM_KEY not in caplog.text
    assert summary.source == "llm" and "[REDACTED]" in summary.text


def test_the_deterministic_summary_labels_a_dry_run() -> None:
    text = deterministic_summary(build_digest(fleet_doc(3, dry_run=True), Redactor())).text
    assert text.startswith("DRY RUN: nothing was changed on any host.\nDRY RUN · ")


def test_importing_the_summarizer_does_not_import_openai() -> None:
    code = "import sys, maintenancebot.summary; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
