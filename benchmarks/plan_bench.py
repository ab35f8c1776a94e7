"""The planning side and memory: validate + plan of many runbooks, daemon idle RSS, a run's peak RSS.

1. Generates RUNBOOKS runbooks (default 50, each with a schedule, conditions, registers, template
   vars and an action) and an inventory of INVENTORY hosts (default 1,000, in groups) in a temp
   dir, and times, in this process, the code `maintenancebot validate` and `plan` use: validating
   all of it (`loader.validate_paths`), then loading the inventory once and planning every runbook
   against it (`load_runbook` + `build_plan`), without connecting anywhere. Goal: under 1 s.
   The CLI `validate` of the same files is timed too, interpreter start included.
2. Starts `maintenancebot daemon` on a config with those runbooks and that inventory, waits for
   its "ready" line and a few idle seconds, and reads VmRSS from /proc. Goal: under 80 MB.
3. Starts RUN_HOSTS local sshd hosts (default 500; the test fleet) and runs the benchmark workload
   on all of them at once with the CLI `run`; its peak RSS is ru_maxrss from wait4. Goal: under
   300 MB. `--run-hosts 0` skips it.

    .venv/bin/python benchmarks/plan_bench.py [--runbooks 50] [--inventory 1000] [--run-hosts 500]

This is a benchmark that prints figures, not a test; it contacts loopback only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssh_bench import maintenancebot_tools, seed

from maintenancebot.inventory import resolve_inventory
from maintenancebot.loader import load_inventory, load_runbook, validate_paths
from maintenancebot.plan import RunbookSource, build_plan
from maintenancebot.testing.fleet import Fleet

GROUPS = 20
MB = 1024 * 1024


# ----------------------------------------------------------------------------- files


def write_inventory(path: Path, hosts: int) -> None:
    per_group = max(1, hosts // GROUPS)
    names = [f"node-{i:04d}" for i in range(hosts)]
    lines = ["defaults: {user: maint, port: 22, identity_file: /etc/maintenancebot/id_ed25519}",
             "groups:"]
    for g in range(GROUPS):
        members = names[g * per_group:(g + 1) * per_group]
        lines.append(f"  g{g:02d}: {{hosts: [{', '.join(members)}], "
                     f"vars: {{log_retention_days: {7 + g}}}}}")
    lines.append("  even: {children: [" + ", ".join(f"g{g:02d}" for g in range(0, GROUPS, 2))
                 + "]}")
    lines.append("hosts:")
    for i, name in enumerate(names):
        lines.append(f"  {name}: {{address: 10.{i // 65536}.{i // 256 % 256}.{i % 256}, "
                     f"vars: {{rack: r{i % 40}}}}}")
    path.write_text("\n".join(lines) + "\n")


def write_runbook(path: Path, number: int) -> None:
    hosts = ["all", "even", f"g{number % GROUPS:02d}", "all:!g00", "node-00*"][number % 5]
    path.write_text(f"""\
name: runbook-{number:02d}
description: generated runbook {number}
schedule: "{number % 60} {number % 24} * * *"
hosts: "{hosts}"
concurrency: 20
batches: [1, 10%, 100%]
max_failures: 5%
vars: {{log_retention_days: 30, threshold: {50 + number % 40}}}
steps:
  - name: Free disk
    run: df -P / | awk 'NR==2 {{print $5}}' | tr -d %
    readonly: true
    register: disk
  - name: Old logs
    when: "disk.stdout | int > threshold"
    run: find /var/log -name '*.gz' -mtime +{{{{ log_retention_days }}}}
    readonly: true
    register: old
  - name: Prune logs
    when: "old.stdout_lines | length > 0"
    action: safe_delete
    with: {{paths: ["/var/log/**/*.gz"], older_than: "{{{{ log_retention_days }}}}d",
            within: [/var/log]}}
  - name: Rack marker
    run: echo {{{{ rack }}}} > /tmp/rack
    rollback: rm -f /tmp/rack
  - name: Reboot
    when: "host.name.endswith('1')"
    approval: {{required: true, timeout: 4h}}
    run: systemctl reboot
""")


def generate(base: Path, runbooks: int, hosts: int) -> tuple[Path, Path]:
    books = base / "runbooks"
    books.mkdir(parents=True, exist_ok=True)
    for number in range(runbooks):
        write_runbook(books / f"runbook-{number:02d}.yaml", number)
    inventory = base / "inventory.yaml"
    write_inventory(inventory, hosts)
    return books, inventory


# ----------------------------------------------------------------------------- timing


def validate_and_plan(books: Path, inventory: Path) -> tuple[float, float, int]:
    """Seconds to validate everything, seconds to plan every runbook, hosts planned in all."""
    started = time.perf_counter()
    issues = validate_paths([books, inventory])
    validated = time.perf_counter()
    if issues:
        raise SystemExit("generated files do not validate:\n" + "\n".join(map(str, issues[:10])))
    resolved = resolve_inventory(load_inventory(inventory))
    planned = 0
    for path in sorted(books.glob("*.yaml")):
        plan = build_plan(load_runbook(path), resolved,
                          RunbookSource.from_text(path, path.read_bytes()))
        planned += len(plan.hosts)
    return validated - started, time.perf_counter() - validated, planned


def cli_validate(books: Path, inventory: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "maintenancebot", "validate", str(books),
                    str(inventory)], check=True, capture_output=True)
    return time.perf_counter() - started


def daemon_rss(base: Path, books: Path, inventory: Path, settle: float) -> int:
    """VmRSS in bytes of an idle `maintenancebot daemon` with these runbooks and inventory."""
    config = base / "daemon-config.yaml"
    config.write_text(f"runbooks: {books}\ninventory: {inventory}\nstate_dir: {base / 'state'}\n")
    log = (base / "daemon.log").open("w+b")
    daemon = subprocess.Popen([sys.executable, "-m", "maintenancebot", "--config", str(config),
                               "daemon"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while b"ready" not in (base / "daemon.log").read_bytes():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not get ready:\n"
                                 + (base / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)
        time.sleep(settle)  # idle: after start-up's garbage, with the scheduler waiting
        return vm_rss(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_peak_rss(base: Path, hosts: int) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of the CLI `run` of the workload on `hosts` sshd hosts,
    all at once (concurrency = hosts)."""
    with Fleet(base / "fleet", hosts, prefix="mem") as fleet:
        names = fleet.names
        work = base / "run"
        work.mkdir()
        run_tool = maintenancebot_tools(fleet, names, work)[0]
        seed(fleet, names)
        started = time.perf_counter()
        proc = subprocess.Popen(run_tool.argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"the {hosts}-host run failed (exit {proc.returncode}):\n"
                             + stderr.decode(errors="replace")[-2000:])
        return usage.ru_maxrss * 1024, wall  # Linux: kilobytes


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runbooks", type=int, default=50)
    parser.add_argument("--inventory", type=int, default=1000, help="inventory hosts")
    parser.add_argument("--repeat", type=int, default=5, help="validate+plan repetitions")
    parser.add_argument("--run-hosts", type=int, default=500,
                        help="sshd hosts for the peak-RSS run (0 skips it)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="idle seconds before reading the daemon's RSS")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mb-plan-bench-") as tmp:
        base = Path(tmp)
        books, inventory = generate(base, args.runbooks, args.inventory)
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        results = [validate_and_plan(books, inventory) for _ in range(args.repeat)]
        validate = statistics.median(r[0] for r in results)
        plan = statistics.median(r[1] for r in results)
        total = statistics.median(r[0] + r[1] for r in results)
        print(f"\n{args.runbooks} runbooks × {args.inventory} hosts ({results[0][2]} host plans), "
              f"median of {args.repeat}:")
        print(f"  validate {validate:.3f} s + plan {plan:.3f} s = {total:.3f} s  "
              f"[{'met' if total < 1 else 'NOT MET'}: goal < 1 s]")
        print(f"  CLI `maintenancebot validate` (interpreter start included): "
              f"{cli_validate(books, inventory):.2f} s")
        rss = daemon_rss(base, books, inventory, args.settle)
        print(f"\ndaemon idle RSS ({args.runbooks} runbooks scheduled, {args.inventory}-host "
              f"inventory): {rss / MB:.1f} MB  [{'met' if rss < 80 * MB else 'NOT MET'}: "
              "goal < 80 MB]")
        if args.run_hosts:
            print(f"\nstarting {args.run_hosts} sshd hosts for the peak-RSS run ...", flush=True)
            peak, wall = run_peak_rss(base, args.run_hosts)
            print(f"{args.run_hosts}-host run (5 steps, all hosts at once): peak RSS "
                  f"{peak / MB:.1f} MB, wall {wall:.1f} s  "
                  f"[{'met' if peak < 300 * MB else 'NOT MET'}: goal < 300 MB]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
