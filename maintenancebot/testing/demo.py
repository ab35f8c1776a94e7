"""`make demo`: a throwaway fleet of sshd hosts on loopback, and the example runbooks run on it.

What a newcomer sees is what an operator sees: the real `maintenancebot` commands, run as
subprocesses against real sshd hosts (127.0.0.x), with the config and inventory written to
`.demo/` so the same commands can be typed by hand afterwards. The hosts' "root filesystems" are
directories under `.demo/fleet/hosts/`; the runbooks' `{{ root }}` prefix points there, so the
demo never touches the machine's own /var.

    python -m maintenancebot.testing.demo [--dir .demo] [--keep] [--hosts 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maintenancebot.testing.fleet import Fleet

REPO = Path(__file__).resolve().parents[2]
DAY = 86400


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maintenancebot.testing.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".demo"),
                        help="where the fleet, config, inventory and state go (default .demo)")
    parser.add_argument("--hosts", type=int, default=3, help="how many sshd hosts (default 3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the hosts running after the demo, until Ctrl-C")
    args = parser.parse_args(argv)

    workdir = args.dir.absolute()
    # The hosts are root-login sshds and a dockerd: a demo ended by SIGTERM (pkill, a CI
    # timeout) or SIGHUP (its terminal closed) must stop them as the normal end does, not die
    # and leave them listening; exiting through Python's unwinding runs every `finally`.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    # A fresh fleet each time (new keys, new files), so a fresh state too: an earlier demo's
    # history, trash entries and approvals would point at hosts and files that are gone.
    for leftover in ("fleet", "state"):
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    fleet = Fleet(workdir / "fleet", args.hosts)
    banner(f"starting {args.hosts} sshd hosts on loopback ({workdir / 'fleet'})")
    with fleet:
        for name in fleet.names:
            print(f"  {name}  {fleet.host(name).address}:{fleet.host(name).port}  "
                  f"root={fleet.root(name)}", flush=True)
        seed(fleet)
        docker = start_docker(workdir)
        try:
            return _show(fleet, workdir, docker, keep=args.keep)
        finally:
            if docker is not None:
                docker.stop()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _show(fleet: Fleet, workdir: Path, docker: Any, *, keep: bool) -> int:
    config = write_files(fleet, workdir, docker.socket if docker else None)
    env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(config)}
    failures = 0
    for command, expected in script(fleet):
        failures += run(command, env, expected)
        if command[:2] == ["run", "fleet-health"]:
            failures += approval_gate(fleet.names[-1], env)
    banner("done")
    print(f"Try it yourself:\n  export MAINTENANCEBOT_CONFIG={config}\n"
          f"  {bot()} history\n  {bot()} plan fleet-health --hosts 'web'")
    if keep:
        print("\nThe hosts keep running until Ctrl-C.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    else:
        print(f"(the hosts stop now; `{sys.executable} -m maintenancebot.testing.demo "
              "--keep` keeps them up)")
    return 1 if failures else 0


DEMO_ONCALL = "demo-oncall"  # the approver the demo answers as


def script(fleet: Fleet) -> list[tuple[list[str], set[int]]]:
    """The commands shown, with the exit codes that mean the demo works as intended."""
    last = fleet.names[-1]
    return [
        (["validate", str(REPO / "runbooks"), str(REPO / "inventory")], {0}),
        (["plan", "fleet-health"], {0}),
        # The last host has a pending reboot, and the reboot step waits for a human: the demo
        # runs the others first, then that host alone, and denies the reboot (approval_gate).
        (["run", "fleet-health", "--hosts", f"!{last}"], {0}),
        # The weekly job, dry-run first: the real packages (apt-get -s of this machine), log
        # files, Docker images, backups and certificates, host by host.
        # host-02's backup is three days old: its check fails (exit 1), and the summary says so.
        (["plan", "weekly-maintenance"], {1}),
        # The demo hosts share this machine's apt: the demo never upgrades your packages.
        (["run", "weekly-maintenance", "--var", "apply_patches=false", "--hosts", f"!{last}"],
         {1}),
        # The first host pretends its disk is full: old temp files and the apt cache go to trash.
        (["run", "disk-pressure"], {0}),
        (["trash", "list"], {0}),
        (["history", "--limit", "8"], {0}),
    ]


def start_docker(workdir: Path) -> Any:
    """A private dockerd with a few images for docker_prune, when this machine can run one."""
    from maintenancebot.testing.dockerd import Dockerd, DockerdError

    # Fresh each time, like the fleet: the last demo's images and its "web" container are in
    # there (the next `create_container(name="web")` would be refused), and the last run of
    # docker_prune removed some of them. A dockerd killed outright (SIGKILL) leaves its data
    # root mounted on itself: unmounted first, or neither this nor `rm -rf` could remove it.
    # (os.path.ismount cannot tell such a mount: same device, same directory.)
    data = workdir / "dockerd" / "data"
    while data.is_dir() and subprocess.run(["umount", str(data)], check=False,
                                           capture_output=True).returncode == 0:
        pass  # one layer per call; "not mounted" ends it
    shutil.rmtree(workdir / "dockerd", ignore_errors=True)
    daemon = Dockerd(workdir / "dockerd")
    try:
        daemon.start()
    except DockerdError as exc:
        print(f"  (no Docker clean-up in this demo: {exc})", flush=True)
        return None
    daemon.import_image("demo/web:1", {"index.html": b"v1"})
    daemon.create_container("demo/web:1", name="web")        # in use: kept
    daemon.import_image("demo/web:0", {"index.html": b"v0"})  # unused: removed
    daemon.import_image("demo/batch:2024", {"job.sh": b"echo batch\n"})
    print(f"  dockerd for host-01 at {daemon.socket}", flush=True)
    return daemon


def seed(fleet: Fleet) -> None:
    """Give the hosts something to find: stale temp files, logs of every age, backups,
    certificates near and far from expiry, a package cache, a pending reboot."""
    now = time.time()

    def aged(path: Path, days: float, content: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (now - days * DAY, now - days * DAY))

    for number, name in enumerate(fleet.names):
        root = fleet.root(name)
        for directory in ("var/tmp", "var/run", "tmp"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        for age in range(number + 1):
            aged(root / f"var/tmp/build-{age}.tmp", 20 + age, b"scratch\n" * 100)
        aged(root / "var/tmp/session.lock", 0.1, b"in use\n")           # too young to touch
        aged(root / "var/log/app/app.log", 0, b"today\n" * 200)         # live: never touched
        aged(root / "var/log/app/app.log.1", 2, b"two days ago\n" * 200)    # compressed
        aged(root / "var/log/app/app.log.2.gz", 12, os.urandom(512))       # kept (< 30 days)
        aged(root / "var/log/app/app.log.3.gz", 45, os.urandom(512))       # pruned
        aged(root / "var/cache/apt/archives/openssl_3.0.15-1_amd64.deb", 3, os.urandom(2048))
        # The second host's nightly backup did not run for three days: an alert, not a failure.
        aged(root / "srv/backups/db-nightly.tar.gz", 3 if number == 1 else 0.2, os.urandom(4096))
        aged(root / "etc/letsencrypt/live/site/fullchain.pem", 0,
             certificate(f"{name}.example", days=10 if number == 0 else 80))
    (fleet.root(fleet.names[-1]) / "var/run/reboot-required").write_text("*** System restart\n")


def certificate(common_name: str, days: int) -> bytes:
    """A self-signed certificate expiring in `days` (cryptography comes with the dev extra)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days, hours=12))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def write_files(fleet: Fleet, workdir: Path, docker_socket: str | None = None) -> Path:
    state = workdir / "state"
    inventory = workdir / "inventory.yaml"
    inventory.write_text(demo_inventory(fleet, docker_socket))
    config = workdir / "config.yaml"
    config.write_text(fleet.config_yaml(state, runbooks=REPO / "runbooks", inventory=inventory)
                      + f"approvers: {{cli: [{DEMO_ONCALL}]}}\n")
    print(f"  config:    {config}\n  inventory: {inventory}\n  state:     {state}")
    return config


def demo_inventory(fleet: Fleet, docker_socket: str | None = None) -> str:
    """The fleet's inventory, with the vars that point the example runbooks at each host's
    root directory instead of the machine's real /var, /srv and /etc."""
    lines = fleet.inventory_yaml().split("\nhosts:\n")[0].splitlines() + ["hosts:"]
    for number, name in enumerate(fleet.names):
        host = fleet.host(name)
        root = str(fleet.root(name))
        host_vars = {
            "root": root,
            # weekly-maintenance and disk-pressure: every path inside the host's root
            "log_dirs": [f"{root}/var/log/app"],
            "docker_socket": docker_socket if number == 0 and docker_socket
            else f"{root}/var/run/docker.sock",
            "docker_min_age": "1s",
            "backup_dir": f"{root}/srv/backups",
            "cert_files": [f"{root}/etc/letsencrypt/live/*/fullchain.pem"],
            "reboot_marker": f"{root}/var/run/reboot-required",
            "mount": "/", "threshold_pct": 0 if number == 0 else 85,
            "report_dirs": [f"{root}/var/log", f"{root}/var/tmp", f"{root}/var/cache"],
            "tmp_dirs": [f"{root}/var/tmp", f"{root}/tmp"],
            "tmp_globs": [f"{root}/var/tmp/**/*", f"{root}/tmp/**/*"],
            "cache_dirs": [f"{root}/var/cache/apt/archives"],
            "cache_globs": [f"{root}/var/cache/apt/archives/*.deb"],
            # fleet-health: the first host pretends its disk is full, so the cleanup really runs
            "disk_threshold_pct": 0 if number == 0 else 80,
            # rolling-restart: no systemd here, so a marker file plays the service
            "service_manager": "command", "health_url": None,
            "service_status": f"test -f {root}/run/app.running",
            "service_start": f"mkdir -p {root}/run && touch {root}/run/app.running",
            "service_stop": f"rm -f {root}/run/app.running",
        }
        entry = {"address": host.address, "port": host.port, "vars": host_vars}
        lines.append(f"  {name}: {json.dumps(entry)}")
    return "\n".join(lines) + "\n"


def bot() -> str:
    return f"{sys.executable} -m maintenancebot"


def run(command: list[str], env: dict[str, str], expected: set[int]) -> int:
    banner("maintenancebot " + " ".join(shlex.quote(part) for part in command))
    result = subprocess.run([sys.executable, "-m", "maintenancebot", *command], env=env,
                            check=False)
    if result.returncode in expected:
        return 0
    print(f"!! exit code {result.returncode}, expected {sorted(expected)}", file=sys.stderr)
    return 1


def approval_gate(host: str, env: dict[str, str]) -> int:
    """The gated reboot on the host that needs one: the run parks it and waits, on-call looks
    at the request (`approvals`) and says no from another terminal (`deny`); the run goes on."""
    command = ["run", "fleet-health", "--hosts", host]
    banner("maintenancebot " + " ".join(command) + "   (in the background: it will wait)")
    waiting = subprocess.Popen([sys.executable, "-m", "maintenancebot", *command], env=env)
    request = None
    deadline = time.monotonic() + 60
    while request is None and time.monotonic() < deadline and waiting.poll() is None:
        time.sleep(0.5)
        listed = subprocess.run([sys.executable, "-m", "maintenancebot", "approvals", "--json"],
                                env=env, capture_output=True, text=True, check=False)
        open_requests = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
        request = next((r["id"] for r in open_requests if r["step"].startswith("Reboot")), None)
    if request is None:
        waiting.kill()
        print("!! no approval request appeared", file=sys.stderr)
        return 1
    failures = run(["approvals"], env, {0})
    failures += run(["deny", str(request), "--reason", "not during the demo", "--by", DEMO_ONCALL],
                    env, {0})
    if waiting.wait(timeout=60) != 0:
        print(f"!! the gated run exited {waiting.returncode}, expected 0", file=sys.stderr)
        failures += 1
    return failures


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
