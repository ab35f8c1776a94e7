"""A whole run reported: real sshd hosts, the CLI as a process, the real `openai` and `slack_sdk`
clients against local servers. Secrets planted everywhere must come out nowhere."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest

from maintenancebot.testing.fleet import Fleet
from tests.httpfakes import Reply, chat_completion, fake_server, slack_ok
from tests.test_cli import Cli

DB_PASSWORD = "pl4nted-Db-Pw-93xqLm"        # an inventory var: `env:DB_PASSWORD`
LLM_KEY = "sk-planted-llm-key-5Tq9wZr2"     # the LLM's API key variable
SLACK_TOKEN = "xoxb-1111-2222-plantedSlackTok"
AWS_KEY = "AKIAPLANTED7EXAMPLE9"            # printed by a host: a secret-shaped pattern
SECRETS = [DB_PASSWORD, LLM_KEY, SLACK_TOKEN, AWS_KEY]


@pytest.fixture
def reported(fleet: Fleet, tmp_path: Path) -> Cli:
    cli = Cli(fleet, tmp_path)
    # The first host gets the database password by reference; the bot resolves it at render time.
    cli.inventory.write_text(fleet.inventory_yaml().replace(
        "vars: {root: ", "vars: {dbauth: env:DB_PASSWORD, root: ", 1))
    return cli


def configure(cli: Cli, llm_url: str, slack_url: str) -> dict[str, str]:
    with cli.config.open("a") as config:
        config.write(textwrap.dedent(f"""
            slack: {{channel: C0MAINT, base_url: "{slack_url}"}}
            llm: {{base_url: "{llm_url}", model: test-model}}
        """))
    return {"DB_PASSWORD": DB_PASSWORD, "OPENAI_API_KEY": LLM_KEY,
            "SLACK_BOT_TOKEN": SLACK_TOKEN}


RUNBOOK = """
    hosts: all
    vars: {dbauth: none}
    steps:
      - name: fingerprint  # the secret, transformed on its way into a command
        run: test {{ dbauth | upper }}{{ dbauth | reverse }}{{ dbauth[2:] }} != x
      - name: connect
        run: >-
          echo "connecting with password {{ dbauth }} and key AKIAPLANTED7EXAMPLE9";
          echo "auth failed for {{ dbauth }}" >&2;
          test {{ dbauth }} = none
"""


def everything_written(cli: Cli) -> bytes:
    state = cli.state
    return b"".join(path.read_bytes() for path in state.rglob("*") if path.is_file())


def test_planted_secrets_reach_no_store_log_prompt_or_slack_payload(reported: Cli) -> None:
    reported.runbook("leaky", RUNBOOK)
    with fake_server([chat_completion("The connect step failed on one host.")]) as llm, \
            fake_server([slack_ok()]) as slack:
        env = configure(reported, llm.url, slack.url)
        result = reported.run_with(env, "-vv", "run", "leaky", "--json")
    assert result.returncode == 1, result.stderr  # one host failed its check
    doc = json.loads(result.stdout)
    first = doc["hosts"][0]
    assert first["status"] == "failed" and "[REDACTED" in first["steps"][1]["command"]
    assert first["steps"][0]["status"] == "ok", "the real secret went into the command that ran"
    assert llm.requests and slack.requests, "the LLM was asked and Slack was posted to"
    prompt = llm.requests[0].json()["messages"][-1]["content"]
    assert "connect" in prompt, "the prompt really carries the run's digest"
    sent_to_slack = slack.all_bytes()
    assert b"chat.postMessage" in sent_to_slack
    with sqlite3.connect(reported.state / "maintenancebot.db") as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
    stored = everything_written(reported)
    assert b"connecting with password" in stored, "the output really was stored"
    # A filter makes a form of the secret that no redactor knows: upper-cased, reversed, cut.
    transformed = [DB_PASSWORD.upper(), DB_PASSWORD[::-1], DB_PASSWORD[2:]]
    for secret in SECRETS[:1] + SECRETS[3:] + transformed:
        for place, data in [("store", stored), ("stdout", result.stdout.encode()),
                            ("log", result.stderr.encode()), ("prompt", llm.all_bytes()),
                            ("slack", sent_to_slack)]:
            assert secret.encode() not in data, f"{secret} leaked into the {place}"
    # The keys are sent where they belong (as credentials) and nowhere else.
    assert LLM_KEY.encode() not in sent_to_slack + stored + result.stderr.encode()
    assert SLACK_TOKEN.encode() not in llm.all_bytes() + stored + result.stderr.encode()
    assert "DEBUG" in result.stderr, "-vv really logged (so the log check means something)"


def test_slack_down_marks_notify_failed_and_notify_resends(reported: Cli) -> None:
    reported.runbook("fine", "steps: [{name: hello, run: 'echo hello'}]")
    with fake_server([Reply(500, {"ok": False})]) as slack:
        env = configure(reported, "http://127.0.0.1:9/", slack.url)
        env.pop("OPENAI_API_KEY")  # no LLM key: the deterministic summary, and it says why
        result = reported.run_with(env, "run", "fine")
        assert result.returncode == 0, result.stderr   # the run succeeded; its report did not
        assert "notify" in result.stderr and "maintenancebot notify" in result.stderr
        assert len(slack.requests) == 4, "the first post and its three retries"
    history = json.loads(reported.run_with(env, "history", "--json").stdout)
    run_id = history[0]["run_id"]
    with sqlite3.connect(reported.state / "maintenancebot.db") as db:
        state, summary = db.execute("SELECT notify_state, summary_text FROM runs WHERE id = ?",
                                    (run_id,)).fetchone()
    assert state == "failed" and "succeeded" in summary

    with fake_server([slack_ok()]) as slack:
        config = reported.config.read_text().replace("http://127.0.0.1:9/", slack.url)
        reported.config.write_text(config.replace(
            config.split('base_url: "', 1)[1].split('"', 1)[0], slack.url, 1))
        resent = reported.run_with(env, "notify", run_id[:15], "--json")
        assert resent.returncode == 0, resent.stderr
        assert json.loads(resent.stdout)["notify_state"] == "sent"
        posted = [r.json() if r.headers.get("Content-Type", "").startswith("application/json")
                  else r.body for r in slack.requests]
        assert posted and run_id.encode() in slack.all_bytes()
    with sqlite3.connect(reported.state / "maintenancebot.db") as db:
        assert db.execute("SELECT notify_state FROM runs WHERE id = ?",
                          (run_id,)).fetchone()[0] == "sent"


def test_a_dry_run_is_posted_only_when_asked(reported: Cli) -> None:
    reported.runbook("fine", "steps: [{name: hello, run: 'echo hello'}]")
    with fake_server([slack_ok()]) as slack:
        env = configure(reported, "http://127.0.0.1:9/", slack.url)
        env.pop("OPENAI_API_KEY")
        assert reported.run_with(env, "plan", "fine").returncode == 0
        assert slack.requests == []
        assert reported.run_with(env, "plan", "fine", "--notify").returncode == 0
        assert slack.requests and b"DRY RUN" in slack.all_bytes()
