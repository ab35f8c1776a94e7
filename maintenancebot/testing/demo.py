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
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    # A fresh fleet each time (new keys, new files); the run history in state/ is kept.
    shutil.rmtree(workdir / "fleet", ignore_errors=True)
    fleet = Fleet(workdir / "fleet", args.hosts)
    banner(f"starting {args.hosts} sshd hosts on loopback ({workdir / 'fleet'})")
    with fleet:
        for name in fleet.names:
            print(f"  {name}  {fleet.host(name).address}:{fleet.host(name).port}  "
                  f"root={fleet.root(name)}")
        seed(fleet)
        config = write_files(fleet, workdir)
        env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(config)}
        failures = 0
        for command, expected in script(fleet):
            failures += run(command, env, expected)
        banner("done")
        print(f"Try it yourself:\n  export MAINTENANCEBOT_CONFIG={config}\n"
              f"  {bot()} history\n  {bot()} plan fleet-health --hosts 'web'")
        if args.keep:
            print("\nThe hosts keep running until Ctrl-C.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        else:
            print(f"(the hosts stop now; `{sys.executable} -m maintenancebot.testing.demo "
                  "--keep` keeps them up)")
    return 1 if failures else 0


def script(fleet: Fleet) -> list[tuple[list[str], set[int]]]:
    """The commands shown, with the exit codes that mean the demo works as intended."""
    last = fleet.names[-1]
    return [
        (["validate", str(REPO / "runbooks"), str(REPO / "inventory")], {0}),
        (["plan", "fleet-health"], {0}),
        # The last host has a pending reboot, and the reboot step waits for a human: the demo
        # runs the real thing on the others, and shows the gate in the dry-run above.
        (["run", "fleet-health", "--hosts", f"!{last}"], {0}),
        (["history", "--limit", "5"], {0}),
    ]


def seed(fleet: Fleet) -> None:
    """Give the hosts something to find: stale temp files, old logs, a pending reboot."""
    now = time.time()
    for number, name in enumerate(fleet.names):
        root = fleet.root(name)
        for directory in ("var/tmp", "var/log/app", "var/run", "srv/backups"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        for age in range(number + 1):
            stale = root / "var/tmp" / f"build-{age}.tmp"
            stale.write_text("scratch\n" * 100)
            os.utime(stale, (now - (20 + age) * DAY, now - (20 + age) * DAY))
        for days in (1, 9, 15, 40):
            log = root / "var/log/app" / f"app-{days}d.log"
            log.write_text(f"log line from {days} days ago\n" * 50)
            os.utime(log, (now - days * DAY, now - days * DAY))
        backup = root / "srv/backups" / "db-nightly.tar.gz"
        backup.write_bytes(os.urandom(4096))
    (fleet.root(fleet.names[-1]) / "var/run/reboot-required").write_text("*** System restart\n")


def write_files(fleet: Fleet, workdir: Path) -> Path:
    state = workdir / "state"
    inventory = workdir / "inventory.yaml"
    inventory.write_text(demo_inventory(fleet))
    config = workdir / "config.yaml"
    config.write_text(fleet.config_yaml(state, runbooks=REPO / "runbooks", inventory=inventory))
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


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
