"""The digest: grouped by outcome, bounded in size, redacted, and honest about what it left out."""

from __future__ import annotations

from typing import Any

from maintenancebot.digest import DigestLimits, build_digest, normalize, render_digest
from maintenancebot.redact import Redactor
from maintenancebot.summary import deterministic_summary
from tests.rundocs import NGINX_STDERR, fleet_doc, healthy_steps, host, step

NO_SECRETS = Redactor()


def doc_of(*hosts: dict[str, Any], dry_run: bool = False, status: str = "failed",
           reason: str | None = None) -> dict[str, Any]:
    return {"run_id": "r-1", "runbook": "weekly", "status": status, "dry_run": dry_run,
            "reason": reason, "hosts": list(hosts)}


def test_digest_size_does_not_grow_with_the_fleet() -> None:
    sizes = {n: len(render_digest(build_digest(fleet_doc(n), NO_SECRETS)))
             for n in (5, 50, 500, 5000)}
    print("digest sizes (chars) for the same two distinct failures:", sizes)
    assert max(sizes.values()) <= 2500
    # Once every list is full, only counts grow: one more digit, an "and N more" remainder.
    assert sizes[5000] - sizes[500] < 80


def test_five_hundred_green_hosts_are_one_group_line() -> None:
    digest = build_digest(fleet_doc(500, failures=False), NO_SECRETS)
    assert len(digest.groups) == 1
    group = digest.groups[0]
    assert (group.status, group.hosts.total, group.steps) == ("succeeded", 500, "all 5 steps ok")
    assert "- 500 hosts succeeded: all 5 steps ok (web-0000, web-0001, web-0002 and 497 more)" \
        in render_digest(digest)


def test_each_distinct_failure_names_step_hosts_rc_and_a_short_stderr_tail() -> None:
    digest = build_digest(fleet_doc(50), NO_SECRETS)
    nginx, unreachable = digest.failures
    assert (nginx.step, nginx.status, nginx.rc, nginx.hosts.total) == (
        "Restart nginx", "failed", "1", 2)
    assert nginx.tail is not None and nginx.tail.endswith("(98: Address already in use)")
    assert nginx.tail.count(" | ") == 2
    assert (unreachable.step, unreachable.what, unreachable.hosts.total) == (
        None, "unreachable", 2)
    assert str(digest.failed) == "web-0001, web-0026"
    assert str(digest.unreachable) == "web-0003, web-0028"


def test_stderr_tail_keeps_the_last_lines_within_the_limit() -> None:
    noisy = "\n".join(f"line {i} " + "x" * 150 for i in range(40))
    failing = host("a", "failed", [step(0, "Build", "failed", rc=2, stderr_tail=noisy)])
    (failure,) = build_digest(doc_of(failing), NO_SECRETS).failures
    assert failure.tail is not None and len(failure.tail) <= 300
    assert "line 39" in failure.tail and "line 30" not in failure.tail


def test_hosts_with_errors_that_differ_only_in_numbers_and_names_share_a_group() -> None:
    hosts = [host(f"db-{i}", "unreachable", [], address=f"10.1.0.{i}",
                  error=f"connect to 10.1.0.{i} port 22 (db-{i}): timed out after {i}.5s")
             for i in range(1, 30)]
    digest = build_digest(doc_of(*hosts), NO_SECRETS)
    assert len(digest.groups) == 1 and len(digest.failures) == 1
    assert normalize("pid 4711 sha 3fa9c2e1 at /var/lib/x9") == "pid # sha # at /var/lib/x#"


def test_what_changed_is_read_from_step_details() -> None:
    docker = step(0, "Prune docker", changed=True,
                  details={"images": {"count": 3, "bytes": 3 * 1024**3}, "volumes_pruned": 2})
    certs = step(1, "Check certificates", details={"certs": [
        {"path": "/etc/ssl/a.pem", "days_left": 5}, {"path": "/etc/ssl/b.pem", "days_left": 90}]})
    backup = step(2, "Check backups", details={"stale": True, "newest_age_hours": 50})
    digest = build_digest(doc_of(host("h1", "succeeded", [docker, certs, backup]),
                                 host("h2", "succeeded", healthy_steps("h2"))), NO_SECRETS)
    text = render_digest(digest)
    assert '"Prune docker" changed on 1 host (h1): images count 3; images 3.0 GiB; ' \
           "volumes pruned 2" in text
    assert '"Remove rotated logs" changed on 1 host (h2): files 12; size 10.0 MiB' in text
    assert "packages 2: openssl, curl" in text
    assert '- certificate near expiry ("Check certificates"), soonest in 5 days: 1 host: h1' \
        in text
    assert '- backup stale ("Check backups"): 1 host: h1' in text


def test_approvals_pending_and_answered_and_rollback_failures_need_a_human() -> None:
    parked = host("h1", "waiting", [step(0, "Reboot", "waiting", rc=None)])
    denied = host("h2", "succeeded", [step(0, "Reboot", "denied", rc=None)])
    half = host("h3", "failed", [step(0, "Restart", "rollback_failed", rc=1),
                                 step(1, "Migrate", "failed", rc=3, error="boom")])
    digest = build_digest(doc_of(parked, denied, half), NO_SECRETS)
    assert [a.what for a in digest.approvals] == ['"Reboot" awaits approval',
                                                  '"Reboot" was denied']
    needs = [a.what for a in digest.needs_human]
    assert needs[0] == 'rollback failed after "Restart" (host may be half-changed)'
    assert "failed" in needs and '"Reboot" awaits approval' in needs


def test_a_dry_run_is_labelled_and_its_approvals_are_not_a_human_task() -> None:
    gated = host("h1", "succeeded", [step(0, "Reboot", "needs_approval", rc=None)])
    digest = build_digest(doc_of(gated, dry_run=True, status="succeeded"), NO_SECRETS)
    text = render_digest(digest)
    assert text.startswith("DRY RUN: nothing was changed on any host")
    assert '"Reboot" would need approval' in text
    assert digest.needs_human == ()


def test_many_distinct_problems_are_capped_with_an_explicit_remainder() -> None:
    hosts = [host(f"h{i}", "failed", [step(0, f"Step {i}", "failed", rc=i, error=f"E{'x' * i}",
                                           stderr_tail=f"problem {'y' * (i % 50)} {i}")])
             for i in range(400)]
    limits = DigestLimits(max_chars=3000)
    text = render_digest(build_digest(doc_of(*hosts), NO_SECRETS, limits))
    assert len(text) <= 3000
    assert "more (size cap)" in text


def test_secrets_in_errors_stderr_details_and_reason_never_reach_the_digest() -> None:
    secret = "pl4nted-db-secret"
    leaky = host("h1", "failed", [
        step(0, "Dump", "failed", rc=1, error=f"pg_dump: password={secret} rejected",
             stderr_tail=f"FATAL: auth for {secret}\n" + NGINX_STDERR),
        step(1, "Tidy", changed=True, details={"packages": [f"pkg-{secret}"], "count": 1}),
    ], error=f"host error {secret}")
    digest = build_digest(doc_of(leaky, reason=f"aborted: {secret}"), Redactor([secret]))
    text = render_digest(digest)
    assert secret not in text and secret not in repr(digest)
    assert "[REDACTED]" in text


def test_a_document_with_missing_fields_still_digests() -> None:
    digest = build_digest({"run_id": "r", "hosts": [{"host": "a"}, {"host": "b", "steps": [{}]}]},
                          NO_SECRETS)
    assert digest.host_total == 2
    assert render_digest(digest)


def test_secrets_are_masked_before_grouping_collapses_their_digits() -> None:
    secret = "zq9Kx7Lm2Pw5"
    hosts = [host(f"h{i}", "unreachable", [], error=f"auth with {secret} refused")
             for i in range(3)]
    text = render_digest(build_digest(doc_of(*hosts), Redactor([secret])))
    assert secret not in text and normalize(secret) not in text
    assert "auth with [REDACTED] refused" in text


def test_the_same_exit_with_different_causes_is_two_failures() -> None:
    def failing(name: str, cause: str) -> dict[str, Any]:
        return host(name, "failed", [step(0, "Migrate", "failed", rc=1, error="exited 1",
                                          stderr_tail=f"running migration\n{cause}")])
    digest = build_digest(doc_of(failing("a", "disk full"), failing("b", "lock timeout"),
                                 failing("c", "disk full")), NO_SECRETS)
    assert [(f.hosts.total, f.tail) for f in digest.failures] == [
        (2, "running migration | disk full"), (1, "running migration | lock timeout")]
    assert len(digest.groups) == 2


def test_odd_details_make_a_digest_less_informative_never_broken() -> None:
    odd = [None, [], "text", {"warn_days": "soon", "days_left": "x"}, {"bytes": "many"},
           {"files": {"nested": {"deeper": 1}}}, {"stale": []}, {"packages": [None, 3, {}]}]
    steps = [step(i, f"S{i}", changed=True, details=details) for i, details in enumerate(odd)]
    text = render_digest(build_digest(doc_of(host("h", "succeeded", steps)), NO_SECRETS))
    assert '"S0" changed on 1 host (h)' in text


def test_a_host_that_failed_outside_any_step_is_named_by_its_status_alone() -> None:
    stopped = "stopped with Ctrl-C: the steps in flight finished, no further step started"
    hosts = [host("db-1", "interrupted", healthy_steps("db-1"), error=stopped),
             host("db-2", "unreachable", [], error="cannot connect to db-2: refused")]
    digest = build_digest(doc_of(*hosts), NO_SECRETS)
    summary = deterministic_summary(digest).text
    assert f"• interrupted on 1 host: {stopped}" in summary
    assert "• unreachable on 1 host: cannot connect to db-2: refused" in summary
    assert "- interrupted on 1 host: db-1" in render_digest(digest)
    assert '"(' not in summary + render_digest(digest)  # no made-up step name in quotes
