"""Run documents (the shape of views.run_document) for digest, summary and Slack tests.

A fleet of N hosts runs the same weekly runbook; hosts 1, 26, 51, … fail to restart nginx and hosts
3, 28, 53, … are unreachable, so every fleet size has exactly the same two distinct failures.
"""

from __future__ import annotations

from typing import Any

NGINX_STDERR = (
    "Job for nginx.service failed because the control process exited with error code.\n"
    "See \"systemctl status nginx.service\" and \"journalctl -xeu nginx.service\" for details.\n"
    "nginx: [emerg] bind() to 0.0.0.0:443 failed (98: Address already in use)\n"
)


def step(index: int, name: str, status: str = "ok", **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": index, "name": name, "kind": "step", "status": status, "rc": 0,
        "changed": False, "command": f"run {name.lower()}", "error": None, "stderr_tail": None,
        "started_at": None, "finished_at": None,
    }
    entry.update(fields)
    return entry


def healthy_steps(host: str) -> list[dict[str, Any]]:
    return [
        step(0, "Free disk on /", command="df -P /"),
        step(1, "Remove rotated logs", changed=True, rc=None,
             details={"files": 12, "bytes": 10 * 1024 * 1024}),
        step(2, "Apply security updates", changed=True, rc=None,
             details={"packages": [{"name": "openssl", "to": "3.0.13"}, "curl"]}),
        step(3, "Restart nginx", changed=True, command="systemctl restart nginx"),
        step(4, "Check certificates", rc=None,
             details={"certs": [{"path": f"/etc/ssl/{host}.pem", "days_left": 200}]}),
    ]


def nginx_failure_steps(host: str) -> list[dict[str, Any]]:
    steps = healthy_steps(host)[:3]
    steps.append(step(3, "Restart nginx", "failed", rc=1, command="systemctl restart nginx",
                      error="command exited 1", stderr_tail=NGINX_STDERR))
    steps.append(step(4, "Check certificates", "skipped", rc=None))
    return steps


def host(name: str, status: str, steps: list[dict[str, Any]],
         error: str | None = None, address: str = "10.0.0.1") -> dict[str, Any]:
    return {"host": name, "address": address, "status": status, "error": error, "steps": steps}


def fleet_doc(count: int, *, failures: bool = True, dry_run: bool = False,
              run_id: str = "20240601-0300-abcd") -> dict[str, Any]:
    hosts = []
    for index in range(count):
        name = f"web-{index:04d}"
        address = f"10.0.{index // 250}.{index % 250 + 1}"
        if failures and index % 25 == 1:
            hosts.append(host(name, "failed", nginx_failure_steps(name), address=address))
        elif failures and index % 25 == 3:
            hosts.append(host(name, "unreachable", [], address=address,
                              error=f"connect to {address} port 22: Connection timed out"))
        else:
            hosts.append(host(name, "succeeded", healthy_steps(name), address=address))
    status = "failed" if failures else "succeeded"
    return {"run_id": run_id, "runbook": "weekly-maintenance", "status": status,
            "dry_run": dry_run, "reason": None, "started_by": "cron", "hosts": hosts}
