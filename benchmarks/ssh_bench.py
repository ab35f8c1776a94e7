"""maintenancebot against the raw-paramiko floor, pyinfra and Ansible, on the same local sshd hosts.

Starts a fleet of real OpenSSH sshd hosts on loopback (`maintenancebot.testing.fleet`, the test
fleet), then runs the same 5-step workload with every tool, alternating tools within each
repetition so that a machine getting busier or calmer affects all of them alike:

    uptime; df -P /; list logs older than 7 days; delete them; test -d /srv

Every tool is started as its own command, the way a user starts it (interpreter start-up and
imports included), and every run must exit 0 or the benchmark says so. Printed per host count:
min/median/max wall time and controller CPU (user+sys of the tool's process tree, from
getrusage(RUSAGE_CHILDREN)), the machine's whole busy CPU (controller + every sshd and command, from
/proc/stat), the ratio of the median wall to the floor's, and the cost per host.

    .venv/bin/python benchmarks/ssh_bench.py --hosts 10 50 200 --repeat 5

Tools: `maintenancebot` (the CLI `run`, a real run with the store), `maintenancebot dry-run`
(the CLI `plan`), `floor` (benchmarks/floor_paramiko.py), and, when installed (the `bench` extra:
`pip install -e '.[bench]'`), `ansible` (ansible-playbook, forks=N, pipelining, strategy free) and
`pyinfra` (--parallel N). Only loopback addresses, or a network namespace this script creates, are
ever contacted. This is a benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.delay_proxy import DelayProxy
from maintenancebot.models import Host
from maintenancebot.testing.fleet import Fleet

BIN = Path(sys.executable).parent
DAY = 86400
OLD_LOGS = 3  # per host and run: the files the workload finds and deletes
_NETNS_FLAG = "MAINTENANCEBOT_BENCH_IN_NETNS"


def workload(root: str) -> list[str]:
    """The 5 commands for one host, whose file tree lives under `root`."""
    logs = f"{root}/var/log"
    return [
        "uptime",
        "df -P /",
        f"find {logs} -type f -name '*.log' -mtime +7",
        f"find {logs} -type f -name '*.log' -mtime +7 -delete",
        "test -d /srv",
    ]


# ----------------------------------------------------------------------------- tools


@dataclass
class Tool:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # Called before each run, after seeding: per-run setup that must not be measured.
    before: Callable[[], None] | None = None


@dataclass
class Sample:
    wall: float
    cpu: float  # the tool's process tree: user + sys
    machine: float  # every CPU second the machine spent meanwhile (hosts included)


def maintenancebot_tools(fleet: Fleet, names: list[str], work: Path) -> list[Tool]:
    n = len(names)
    inventory = work / "inventory.yaml"
    lines = [(f"defaults: {{user: {json.dumps(fleet.user)}, "
             f"identity_file: {json.dumps(str(fleet.client_key))}}}"),
             "hosts:"]
    for name in names:
        host = fleet.host(name)
        lines.append(f"  {name}: {{address: {host.address}, port: {host.port}, "
                     f"vars: {{root: {json.dumps(str(fleet.root(name)))}}}}}")
    inventory.write_text("\n".join(lines) + "\n")
    runbook = work / "bench.yaml"
    steps = workload("ROOT")
    runbook.write_text(f"""\
name: bench
description: the 5-step benchmark workload
hosts: all
concurrency: {n}
steps:
  - {{name: uptime, run: {json.dumps(steps[0])}, readonly: true}}
  - {{name: disk, run: {json.dumps(steps[1])}, readonly: true}}
  - name: old logs
    run: {json.dumps(steps[2].replace("ROOT", "{{ root | raw }}"))}
    readonly: true
    register: old_logs
  - name: delete old logs
    run: {json.dumps(steps[3].replace("ROOT", "{{ root | raw }}"))}
  - {{name: srv, run: {json.dumps(steps[4])}, readonly: true}}
""")
    config = work / "config.yaml"
    config.write_text(fleet.config_yaml(work / "state", inventory=inventory))
    bot = [sys.executable, "-m", "maintenancebot", "--config", str(config)]
    return [Tool("maintenancebot", [*bot, "run", str(runbook)]),
            Tool("maintenancebot dry-run", [*bot, "plan", str(runbook)])]


def floor_tools(fleet: Fleet, names: list[str], work: Path) -> list[Tool]:
    """The floor: one connection and one thread per host, the 5 bare commands, nothing else."""
    spec = {
        "known_hosts": str(fleet.known_hosts), "key": str(fleet.client_key),
        "hosts": [{"address": fleet.host(n).address, "port": fleet.host(n).port,
                   "user": fleet.user, "commands": workload(str(fleet.root(n)))}
                  for n in names],
    }
    path = work / "floor.json"
    path.write_text(json.dumps(spec))
    return [Tool("floor (raw paramiko)",
                 [sys.executable, str(REPO / "benchmarks" / "floor_paramiko.py"), str(path)])]


def ansible_tool(fleet: Fleet, names: list[str], work: Path) -> Tool | None:
    playbook_bin = shutil.which("ansible-playbook", path=f"{BIN}:{os.environ.get('PATH', '')}")
    if playbook_bin is None:
        return None
    inventory = {"all": {"hosts": {
        name: {"ansible_host": fleet.host(name).address, "ansible_port": fleet.host(name).port,
               "root": str(fleet.root(name))} for name in names}}}
    (work / "ansible-inventory.json").write_text(json.dumps(inventory))
    steps = workload("{{ root }}")
    tasks = [{"name": f"step {i + 1}", "ansible.builtin.shell": cmd, "changed_when": i == 3}
             for i, cmd in enumerate(steps)]
    play = [{"hosts": "all", "gather_facts": False, "strategy": "free", "tasks": tasks}]
    (work / "playbook.yml").write_text(json.dumps(play))
    control = work / "ansible-cp"
    ssh_args = (f"-o UserKnownHostsFile={fleet.known_hosts} -o StrictHostKeyChecking=yes "
                "-o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=5s")
    env = {
        "ANSIBLE_CONFIG": str(work / "no-ansible.cfg"),  # ignore any ansible.cfg around us
        "ANSIBLE_FORKS": str(len(names)),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_REMOTE_USER": fleet.user,
        "ANSIBLE_PRIVATE_KEY_FILE": str(fleet.client_key),
        "ANSIBLE_SSH_ARGS": ssh_args,
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": "C.UTF-8",
    }

    def fresh_control_dir() -> None:
        # A new ControlPath dir per run: every run opens its own connections, as a cold run does.
        shutil.rmtree(control, ignore_errors=True)
        control.mkdir()

    return Tool("ansible-playbook", [playbook_bin, "-i", str(work / "ansible-inventory.json"),
                                     str(work / "playbook.yml")],
                env=env, cwd=work, before=fresh_control_dir)


def pyinfra_tool(fleet: Fleet, names: list[str], work: Path) -> Tool | None:
    pyinfra_bin = shutil.which("pyinfra", path=f"{BIN}:{os.environ.get('PATH', '')}")
    if pyinfra_bin is None:
        return None
    hosts = [(name, {"ssh_hostname": fleet.host(name).address, "ssh_port": fleet.host(name).port,
                     "ssh_user": fleet.user, "ssh_key": str(fleet.client_key),
                     "ssh_known_hosts_file": str(fleet.known_hosts),
                     "ssh_strict_host_key_checking": "yes", "root": str(fleet.root(name))})
             for name in names]
    (work / "pyinfra_inventory.py").write_text(f"hosts = {hosts!r}\n")
    steps = workload("ROOT")
    ops = "\n".join(
        f"server.shell(name='step {i + 1}', commands=[{cmd!r}.replace('ROOT', host.data.root)])"
        for i, cmd in enumerate(steps))
    (work / "pyinfra_deploy.py").write_text(
        "from pyinfra import host\nfrom pyinfra.operations import server\n" + ops + "\n")
    return Tool("pyinfra", [pyinfra_bin, "-y", "--parallel", str(len(names)),
                            str(work / "pyinfra_inventory.py"), str(work / "pyinfra_deploy.py")],
                cwd=work)


# ----------------------------------------------------------------------------- measuring


def seed(fleet: Fleet, names: list[str]) -> None:
    """Logs for the workload to find: OLD_LOGS stale ones (deleted by a run) and a fresh one."""
    old = time.time() - 10 * DAY
    for name in names:
        logs = fleet.root(name) / "var" / "log"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "current.log").write_text("today\n")
        for i in range(OLD_LOGS):
            path = logs / f"old-{i}.log"
            path.write_text("stale\n")
            os.utime(path, (old, old))


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(tool: Tool) -> Sample:
    if tool.before:
        tool.before()
    env = {**os.environ, **tool.env}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = busy_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(tool.argv, env=env, cwd=tool.cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, check=False)
    wall = time.perf_counter() - started
    machine = busy_cpu_seconds() - machine
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
        raise SystemExit(f"{tool.name} failed (exit {done.returncode}):\n{tail}")
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return Sample(wall, cpu, machine)


def bench(fleet: Fleet, n: int, repeat: int, wanted: set[str], base: Path) -> dict[str, list[Sample]]:
    names = fleet.names[:n]
    work = base / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    tools: list[Tool] = [*floor_tools(fleet, names, work), *maintenancebot_tools(fleet, names, work)]
    for make, label in ((pyinfra_tool, "pyinfra"), (ansible_tool, "ansible")):
        if label not in wanted:
            continue
        tool = make(fleet, names, work)
        if tool is None:
            print(f"  ({label} is not installed: pip install -e '.[bench]'; skipped)")
        else:
            tools.append(tool)
    samples: dict[str, list[Sample]] = {tool.name: [] for tool in tools}
    # One untimed round warms the page cache and sshd's first-connection paths for everyone.
    for tool in tools:
        seed(fleet, names)
        measure(tool)
    for round_ in range(repeat):
        # Rotate the order each round, so no tool always runs right after the same neighbour.
        shift = round_ % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            seed(fleet, names)
            samples[tool.name].append(measure(tool))
    return samples


# ----------------------------------------------------------------------------- report


def report(n: int, samples: dict[str, list[Sample]]) -> list[str]:
    floor_runs = samples["floor (raw paramiko)"]
    floor = statistics.median(s.wall for s in floor_runs)
    title = (f"\n{n} hosts, {len(next(iter(samples.values())))} runs each (wall and CPU in "
             "seconds; CPU = the tool's own processes; machine = all cores busy, sshd hosts "
             "included; paired = median of each round's ratio to that round's floor, which a "
             "machine drifting over the invocation moves less)")
    header = (f"{'tool':<24}{'wall min':>9}{'median':>8}{'max':>8}{'cpu min':>9}{'median':>8}"
              f"{'max':>8}{'machine':>9}{'× floor':>9}{'paired':>8}{'ms/host':>9}"
              f"{'cpu ms/host':>12}")
    lines = [title, header]
    for name, runs in samples.items():
        walls = [s.wall for s in runs]
        cpus = [s.cpu for s in runs]
        wall = statistics.median(walls)
        cpu = statistics.median(cpus)
        paired = statistics.median(s.wall / f.wall for s, f in zip(runs, floor_runs, strict=True))
        lines.append(
            f"{name:<24}{min(walls):>9.2f}{wall:>8.2f}{max(walls):>8.2f}{min(cpus):>9.2f}"
            f"{cpu:>8.2f}{max(cpus):>8.2f}{statistics.median(s.machine for s in runs):>9.2f}"
            f"{wall / floor:>9.2f}{paired:>8.2f}{1000 * wall / n:>9.1f}{1000 * cpu / n:>12.1f}")
    return lines


def goals(results: dict[int, dict[str, list[Sample]]]) -> list[str]:
    """The goals of issue 8, checked against this invocation's medians."""
    def med(n: int, tool: str) -> float | None:
        runs = results.get(n, {}).get(tool)
        return statistics.median(s.wall for s in runs) if runs else None

    lines = ["\ngoals (issue 8):"]
    for n, limit in ((50, 1.2), (200, 1.3)):
        floor, bot, dry = med(n, "floor (raw paramiko)"), med(n, "maintenancebot"), \
            med(n, "maintenancebot dry-run")
        if floor is None or bot is None or dry is None:
            lines.append(f"  {n} hosts: not measured (pass --hosts {n})")
            continue
        lines.append(_goal(f"{n} hosts: run ≤ {limit}× floor", bot / floor <= limit,
                           f"{bot / floor:.2f}×"))
        if n == 50:
            lines.append(_goal("50 hosts: dry-run ≤ 1.2× floor", dry / floor <= 1.2,
                               f"{dry / floor:.2f}×"))
            pyinfra, ansible = med(n, "pyinfra"), med(n, "ansible-playbook")
            if pyinfra is not None:
                lines.append(_goal("50 hosts: below pyinfra", bot < pyinfra,
                                   f"{bot:.2f}s vs {pyinfra:.2f}s"))
            if ansible is not None:
                lines.append(_goal("50 hosts: ≥ 20× faster than ansible", ansible / bot >= 20,
                                   f"{ansible / bot:.1f}×"))
    return lines


def _goal(text: str, met: bool, figure: str) -> str:
    return f"  [{'met' if met else 'NOT MET'}] {text}: {figure}"


# ----------------------------------------------------------------------------- latency


def netem_unsupported() -> str | None:
    """Why `tc netem` cannot delay loopback here, or None if it can (tried in a throwaway netns)."""
    if shutil.which("unshare") is None or shutil.which("tc") is None or shutil.which("ip") is None:
        return "needs unshare, ip and tc (Debian: util-linux, iproute2)"
    userns = [] if os.geteuid() == 0 else ["-r"]
    probe = subprocess.run(
        ["unshare", *userns, "-n", "sh", "-c",
         "ip link set lo up && tc qdisc add dev lo root netem delay 1ms"],
        capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return None
    return probe.stderr.strip() or f"exit {probe.returncode}"


class DelayedFleet:
    """The fleet as seen through a `DelayProxy`: the same hosts on the proxy's ports, with a
    known_hosts that names them there. Everything else is the fleet's own."""

    def __init__(self, fleet: Fleet, ports: dict[str, int], work: Path) -> None:
        self._fleet = fleet
        self._ports = ports
        self.known_hosts = fleet.known_hosts_via(work / "known_hosts-delayed", ports)

    def host(self, name: str) -> Host:
        return self._fleet.host(name).model_copy(update={"port": self._ports[name]})

    def config_yaml(self, state_dir: Path, **paths: Path) -> str:
        return self._fleet.config_yaml(state_dir, known_hosts=self.known_hosts, **paths)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)


def enter_delayed_netns(latency_ms: float, argv: Sequence[str]) -> int:
    """Re-run this script in a new network namespace whose loopback delays every packet by
    latency_ms / 2, so that a round trip (all hosts are on lo there) costs latency_ms."""
    userns = [] if os.geteuid() == 0 else ["-r"]
    script = (f"ip link set lo up && tc qdisc add dev lo root netem delay {latency_ms / 2:g}ms "
              '&& exec "$@"')
    return subprocess.call(["unshare", *userns, "-n", "sh", "-c", script, "sh",
                            sys.executable, *argv], env={**os.environ, _NETNS_FLAG: "1"})


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 50],
                        help="host counts to measure (default: 10 50)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per tool (default 5)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="MS",
                        help="add MS of round-trip time between controller and hosts: with tc "
                             "netem on loopback in a private network namespace, or, where the "
                             "kernel has no netem, through a proxy that delays each direction "
                             "(benchmarks/delay_proxy.py)")
    parser.add_argument("--tools", nargs="+", default=["pyinfra", "ansible"],
                        choices=["pyinfra", "ansible", "none"],
                        help="optional tools to compare against, when installed (default: both; "
                             "`none` for maintenancebot and the floor only)")
    parser.add_argument("--ansible-up-to", type=int, default=50, metavar="N",
                        help="run ansible only up to N hosts (default 50: one 200-host "
                             "ansible run takes minutes, and the goals compare at 50)")
    parser.add_argument("--shared-pids", action="store_true",
                        help="run every host's sshd in the controller's pid namespace (default: "
                             "each in its own, where unshare is allowed, as a machine sees only "
                             "its own processes)")
    parser.add_argument("--workdir", type=Path, help="keep the fleet and files here")
    args = parser.parse_args(argv)

    no_netem = None
    if args.latency > 0 and not os.environ.get(_NETNS_FLAG):
        no_netem = netem_unsupported()
        if no_netem is None:
            return enter_delayed_netns(args.latency, [str(Path(__file__).resolve()), *argv])

    base = args.workdir or Path(tempfile.mkdtemp(prefix="mb-bench-"))
    # An installed package has its bytecode (pip compiles it, as it did pyinfra's and
    # ansible's); a source checkout under PYTHONDONTWRITEBYTECODE would compile ours anew at
    # every start (~0.1 s) and measure the checkout, not the tool.
    compileall.compile_dir(REPO / "maintenancebot", quiet=1)
    print(machine_line())
    if args.latency and no_netem is None:
        print(f"latency: +{args.latency:g} ms round trip (netem on lo, private network namespace)")
    elif args.latency:
        print(f"latency: +{args.latency:g} ms round trip through benchmarks/delay_proxy.py (no "
              f"netem here: {no_netem}); the proxy's CPU is on the same cores")
    no_pid_namespaces = "--shared-pids" if args.shared_pids else pid_namespaces_unsupported()
    if no_pid_namespaces is None:
        print("hosts: each sshd in a pid namespace of its own")
    else:
        print(f"hosts: every sshd in this pid namespace ({no_pid_namespaces})")
    results: dict[int, dict[str, list[Sample]]] = {}
    with Fleet(base / "fleet", max(args.hosts), prefix="bench",
               pid_namespaces=no_pid_namespaces is None) as real_fleet, ExitStack() as stack:
        fleet: Any = real_fleet
        if args.latency and no_netem is not None:
            proxy = stack.enter_context(DelayProxy(
                {name: (real_fleet.host(name).address, real_fleet.host(name).port)
                 for name in real_fleet.names}, args.latency / 2000))
            fleet = DelayedFleet(real_fleet, proxy.ports, base)
        for n in args.hosts:
            print(f"measuring {n} hosts ...", flush=True)
            tools = set(args.tools)
            if "ansible" in tools and n > args.ansible_up_to:
                tools.discard("ansible")
                print(f"  (ansible skipped above {args.ansible_up_to} hosts: --ansible-up-to)")
            results[n] = bench(fleet, n, args.repeat, tools, base)
            print("\n".join(report(n, results[n])), flush=True)
    print("\n".join(goals(results)))
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def pid_namespaces_unsupported() -> str | None:
    """Why the hosts cannot have pid namespaces of their own, or None if they can.

    A machine sees its own processes only; hosts that share one process table each see the
    others' too, which a host-side check over the processes a step started (`ssh_shell`) pays
    for as if 50 hosts' steps ran on every host."""
    try:
        tried = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                "true"], capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"no unshare: {exc}"
    return None if tried.returncode == 0 else f"unshare failed: {tried.stderr.strip()}"


def machine_line() -> str:
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return (f"machine: {os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}, "
            f"{ssh}, kernel {os.uname().release}")


if __name__ == "__main__":
    sys.exit(main())
