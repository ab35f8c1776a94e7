"""The daemon: decides *when* runbooks run; how they run is `app.prepare` + `app.execute`.

Owned here: one cron job per scheduled runbook (through `scheduling`), the decision on every
fire — run, run late, skip (overlap, kill switch, busy hosts, stopping), missed — written to the
store before anything runs, waiting for busy hosts, reload on file change and SIGHUP (through
`watch`), the systemd notify protocol, and a graceful stop. Not here: SQL (`store`), cron
parsing (`scheduling`), printing and exit codes (`cli_daemon`).

Decisions come from the store, not from memory: `handled_until` per runbook says which fire
times were decided, and a fire can be claimed once (UNIQUE in SQLite). So a restart, or two,
never runs a fire twice, and a run interrupted by a crash is not re-run.

Busy hosts: every real run leases all its hosts at once (`app.execute`, so CLI runs too; two
waiting runs cannot deadlock). A scheduled run whose hosts another run holds *waits* for them —
maintenance that was due should happen — until its `window` closes (or its `timeout` passes);
then the fire is recorded `skipped` with the holders. Waiting and giving up are both recorded.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any

from maintenancebot import app, gitsync
from maintenancebot.daemon_http import Live, StatusServer, render_metrics
from maintenancebot.engine import RunOutcome
from maintenancebot.errors import ConfigError, MaintenanceBotError
from maintenancebot.gitsync import SyncResult
from maintenancebot.models import Settings, format_duration
from maintenancebot.notify import RunMessage, notifiers_from_settings, notify_all
from maintenancebot.plan import Plan, build_plan
from maintenancebot.runcontrol import PROCESS_STOP, Event
from maintenancebot.scheduling import CronScheduler, fire_times_between
from maintenancebot.sdnotify import Notifier
from maintenancebot.states import RunStatus
from maintenancebot.store import HostsBusy, RunStore
from maintenancebot.watch import Accepted, Catalog, ChangeWatcher, load_catalog

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
STARTED, LATE, SKIPPED, MISSED, FAILED = "started", "late", "skipped", "missed", "failed"
OLDER_MISSES_RECORDED = 100  # a month-long outage of an every-minute runbook stays bounded


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DaemonError(MaintenanceBotError):
    """The daemon cannot start (another one holds the state directory)."""


class Daemon:
    def __init__(
        self, settings: Settings, *, clock: Clock = _utc_now, poll_interval: float = 2.0,
        stop_timeout: float = 60.0, lease_poll: float = 0.5, notifier: Notifier | None = None,
        listen: tuple[str, int] | None = None, git_pull: float | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._poll_interval = poll_interval
        self._stop_timeout = stop_timeout
        self._lease_poll = lease_poll
        self._notifier = notifier or Notifier()
        self._lock = threading.RLock()
        self._catalog = Catalog()
        self._runs: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._hup = False
        self._watcher = ChangeWatcher(settings)
        self._scheduler = CronScheduler(lambda name, fire: self.decide(name, fire))
        self._lockfile: IO[str] | None = None
        self._store: RunStore | None = None
        self._last_ping = 0.0
        self._last_poll = 0.0
        self._last_tick: float | None = None  # set by the main loop (`serve`), for /healthz
        self._listen = listen
        self._git_pull = git_pull
        self._git_reported: str | None = None  # a rejection or git error is reported once
        self._reload_lock = threading.Lock()  # the main loop and the git thread both reload
        self._http: StatusServer | None = None

    @property
    def store(self) -> RunStore:
        assert self._store is not None, "start() first"
        return self._store

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def next_fires(self) -> dict[str, datetime | None]:
        return self._scheduler.next_fires()

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Lock the state dir, load, catch up on missed fires, schedule, tell systemd READY."""
        self._lockfile = _lock_state_dir(Path(self.settings.state_dir).expanduser())
        self._store = app.open_store(self.settings)
        self.store.audit("daemon.started", actor="daemon", details={"pid": os.getpid()})
        resume_parked_runs(self.settings, self.store)
        self.reload("start", initial=True)
        self._catch_up()
        self._scheduler.start()
        if self._listen is not None:
            self._http = StatusServer(self._listen, self.health, self.metrics)
            self._http.start()
        if self._git_pull is not None:
            threading.Thread(target=self._git_loop, args=(self._git_pull,), name="git-sync",
                             daemon=True).start()
        self._notifier.ready(self._status())
        self._last_ping = time.monotonic()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT (what `maintenancebot daemon` and systemd call)."""
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.start()
        try:
            while not self._stopping.is_set():
                # Short waits and plain flags: a signal handler must not touch locks.
                self._stopping.wait(min(self._poll_interval, 0.25))
                if self._stopping.is_set():
                    break
                self.tick()
        finally:
            self.stop("SIGTERM")
        return 0

    def tick(self) -> None:
        """One turn of the main loop: SIGHUP, file changes, the watchdog."""
        self._last_tick = time.monotonic()
        if self._hup:
            self._hup = False
            self._watcher.mark_current()
            self.reload("SIGHUP")
        elif time.monotonic() - self._last_poll >= self._poll_interval:
            self._last_poll = time.monotonic()
            if self._watcher.changed():
                self.reload("files changed")
        interval = self._notifier.watchdog_interval
        if interval is not None and time.monotonic() - self._last_ping >= interval:
            self._notifier.watchdog()
            self._last_ping = time.monotonic()

    def poll(self) -> bool:
        """Look at the files now (tests; the main loop does this every poll_interval)."""
        if self._watcher.changed():
            self.reload("files changed")
            return True
        return False

    def request_stop(self, reason: str) -> None:
        """Halt every run before its next step; `serve` then stops. Safe in a signal handler:
        it only sets flags."""
        PROCESS_STOP.request(f"daemon stopping ({reason}): the step in flight finished, "
                             "no further step started")
        self._stopping.set()

    def stop(self, reason: str) -> bool:
        """Stop scheduling, let running steps finish (bounded by stop_timeout), record, unlock.

        True if every run ended in time; a run still going is reaped as interrupted by the next
        start (its process will be gone)."""
        self.request_stop(reason)
        self._notifier.stopping(f"stopping ({reason}): waiting for running steps")
        self._scheduler.shutdown()
        if self._http is not None:
            self._http.close()
            self._http = None
        deadline = time.monotonic() + self._stop_timeout
        with self._lock:
            threads = list(self._runs.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:
            log.error("stop timeout (%s) passed with runs in flight: %s; they will be recorded "
                      "interrupted at the next start", format_duration(self._stop_timeout), left)
        if self._store is not None:
            self.store.audit("daemon.stopped", actor="daemon",
                             details={"reason": reason, "runs_left": left})
            self.store.close()
            self._store = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
        if not left:
            PROCESS_STOP.clear()  # an in-process restart (tests) starts with a clean slate
        return not left

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run of this daemon is in flight (tests and graceful stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._runs.values())
            if not threads:
                return True
            threads[0].join(max(0.0, deadline - time.monotonic()))
        return False

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._hup = True

    # ------------------------------------------------------------------------------ reload

    def reload(self, why: str, *, initial: bool = False) -> list[str]:
        """Read runbooks and inventory again; apply what is valid, keep the last valid version
        of what is not, and report every problem. Returns the problems as text."""
        with self._reload_lock:
            return self._reload(why, initial)

    def _reload(self, why: str, initial: bool) -> list[str]:
        if not initial:
            self._notifier.reloading()
        loaded = load_catalog(self.settings, self._catalog)
        with self._lock:
            previous, self._catalog = self._catalog, loaded.catalog
        self._apply_schedule(previous, loaded.catalog, initial)
        problems = [str(issue) for issue in loaded.issues]
        for line in problems:
            log.error("reload (%s): %s", why, line)
        if problems:
            self.store.audit("reload.rejected", actor="daemon",
                             details={"why": why, "issues": problems, "kept": loaded.kept})
            self._announce("reload", "invalid runbook or inventory",
                           "rejected; the last valid version keeps its schedule"
                           + (f" ({', '.join(loaded.kept)})" if loaded.kept else "") + ":\n"
                           + "\n".join(problems))
        self.store.audit("reload.applied", actor="daemon", details={
            "why": why, "runbooks": sorted(loaded.catalog.runbooks),
            "next": {name: when.isoformat() if when else None
                     for name, when in sorted(self._scheduler.next_fires().items())}})
        if not initial:
            self._notifier.ready(self._status())
        return problems

    def sync_git(self) -> SyncResult | None:
        """Fetch the runbooks' repository; fast-forward and reload only a commit that is valid
        whole (see `gitsync`). None when git itself failed (reported once, retried later)."""
        try:
            result = gitsync.sync(self.settings)
        except gitsync.GitError as exc:
            self._report_git("git.failed", str(exc), str(exc), [])
            return None
        if result.state == gitsync.PULLED:
            self._git_reported = None
            log.info("git: %s", result.message)
            self.store.audit("git.pulled", actor="daemon",
                             details={"commit": result.commit, "message": result.message})
            self._watcher.mark_current()
            self.reload(f"git pull {result.commit and result.commit[:12]}")
        elif result.state in (gitsync.REJECTED, gitsync.BLOCKED):
            self._report_git(f"git.{result.state}", result.commit or "", result.message,
                             result.issues)
        return result

    def _report_git(self, action: str, key: str, message: str, issues: list[str]) -> None:
        if self._git_reported == key:
            return
        self._git_reported = key
        for line in [message, *issues]:
            log.error("git: %s", line)
        self.store.audit(action, actor="daemon", details={"message": message, "issues": issues})
        self._announce("git", action.removeprefix("git."), "\n".join([message, *issues]))

    def _git_loop(self, interval: float) -> None:
        while not self._stopping.is_set():
            try:
                self.sync_git()
            except Exception:  # keep pulling next time; a bug here must not stop the daemon
                log.exception("git sync crashed")
            self._stopping.wait(interval)

    def _apply_schedule(self, previous: Catalog, current: Catalog, initial: bool) -> None:
        for name in previous.runbooks.keys() - current.runbooks.keys():
            self._scheduler.remove(name)
            log.info("runbook %s is gone: unscheduled", name)
        for name, entry in current.runbooks.items():
            book, before = entry.runbook, previous.runbooks.get(name)
            if book.schedule is None:
                self._scheduler.remove(name)
                continue
            if before is not None and (before.runbook.schedule, before.runbook.timezone) == (
                    book.schedule, book.timezone):
                continue
            self._scheduler.set(name, book.schedule, book.timezone)
            log.info("runbook %s scheduled: %s (%s)", name, book.schedule, book.timezone)
            if not initial:
                # A new or changed schedule starts now: times it never had are not "missed".
                self.store.set_handled_until(name, self._clock())

    # ------------------------------------------------------------------------------ fires

    def _catch_up(self) -> None:
        """At start: fires missed while the daemon was down, from the store's records."""
        now = self._clock()
        for name, entry in sorted(self._catalog.runbooks.items()):
            book = entry.runbook
            if book.schedule is None:
                continue
            mark = self.store.handled_until(name)
            if mark is None:  # never scheduled before: nothing can have been missed
                self.store.set_handled_until(name, now)
                continue
            missed = fire_times_between(book.schedule, book.timezone, mark, now)
            for older in missed[:-1][-OLDER_MISSES_RECORDED:]:
                self.store.claim_fire(name, older, MISSED, "the daemon was down; only the "
                                      "newest missed fire may run late")
            if len(missed) > 1:
                self._announce(name, "missed", f"{len(missed) - 1} older fire(s) missed while "
                               f"the daemon was down ({missed[0].isoformat()} .. "
                               f"{missed[-2].isoformat()}); not run")
            if missed:
                self.decide(name, missed[-1].astimezone(UTC), late=True)

    def decide(self, name: str, fire_time: datetime, *, late: bool = False) -> None:
        """One fire: record the decision, then (maybe) start the run in its own thread."""
        with self._lock:
            entry = self._catalog.runbooks.get(name)
            if entry is None:
                return
            refusal = self._refusal(entry, fire_time)
            if refusal is not None:
                decision, reason = refusal
                if self.store.claim_fire(name, fire_time, decision, reason) is not None:
                    log.warning("%s fire at %s %s: %s", name, fire_time.isoformat(), decision,
                                reason)
                    self._announce(name, decision, f"fire at {fire_time.isoformat()}: {reason}")
                return
            fire_id = self.store.claim_fire(name, fire_time, LATE if late else STARTED,
                                            "ran late: the daemon was down at the fire time"
                                            if late else None)
            if fire_id is None:
                return  # decided before (a restart, another daemon): never run it twice
            if late:  # the miss is news even though it is being made up for
                self._announce(name, LATE, f"the fire at {fire_time.isoformat()} was missed "
                               "while the daemon was down; running it now, late")
            thread = threading.Thread(target=self._run, args=(entry, fire_id, fire_time, late),
                                      name=f"run-{name}")
            self._runs[name] = thread
            thread.start()
        if self._scheduler.running:  # before READY, the status would say "0 scheduled"
            self._notifier.status(self._status())

    def _refusal(self, entry: Accepted, fire_time: datetime) -> tuple[str, str] | None:
        now, book = self._clock(), entry.runbook
        grace = self.settings.misfire_grace
        if self._stopping.is_set():
            return SKIPPED, "the daemon is stopping"
        if now - fire_time > timedelta(seconds=grace):
            return MISSED, (f"{format_duration((now - fire_time).total_seconds() // 60 * 60)} "
                            f"late, beyond misfire_grace of {format_duration(grace)}; not run")
        if book.window is not None and now >= fire_time + timedelta(seconds=book.window):
            return MISSED, f"its window of {format_duration(book.window)} has closed; not run"
        stop = self.store.stop_state()
        if stop is not None:
            return SKIPPED, f"kill switch set by {stop.by}: {stop.reason}"
        return (SKIPPED, overlap) if (overlap := self._overlap(entry.name)) else None

    def _overlap(self, name: str) -> str | None:
        running = self._runs.get(name)
        if running is not None and running.is_alive():
            return "overlap: the previous run of this runbook is still running"
        self.store.reap_interrupted()
        for run in self.store.list_runs(limit=5, runbook=name, status=RunStatus.RUNNING):
            if not run.dry_run:
                return f"overlap: run {run.id} (started by {run.started_by}) is still running"
        return None

    # ------------------------------------------------------------------------------ runs

    def _run(self, entry: Accepted, fire_id: int, fire_time: datetime, late: bool) -> None:
        try:
            outcome = self._execute_when_hosts_free(self._plan(entry), fire_id, fire_time, late)
            if outcome is None:
                return
            self.store.update_fire(fire_id, run_id=outcome.run_id)
            log.info("%s run %s: %s", entry.name, outcome.run_id, outcome.status)
        except MaintenanceBotError as exc:
            self.store.update_fire(fire_id, decision=FAILED, reason=f"could not start: {exc}")
            self._announce(entry.name, FAILED, f"scheduled run could not start: {exc}")
        except Exception as exc:  # a bug must be loud, and must not kill the daemon
            log.exception("scheduled run of %s crashed", entry.name)
            self.store.update_fire(fire_id, decision=FAILED, reason=f"internal error: {exc}")
        finally:
            with self._lock:
                self._runs.pop(entry.name, None)
            if self._scheduler.running:
                self._notifier.status(self._status())

    def _plan(self, entry: Accepted) -> Plan:
        """The plan from the files as they are; if they are invalid now, from the last valid
        version (the run records which content it ran, by hash)."""
        try:
            return app.prepare(self.settings, str(entry.path), None, None)
        except (ConfigError, OSError) as exc:
            inventory = self._catalog.inventory
            if inventory is None:
                raise
            log.warning("%s: the file is not valid now (%s); running the last valid version",
                        entry.name, exc)
            return build_plan(entry.runbook, inventory, entry.source)

    def _rest_of_window(self, plan: Plan, fire_time: datetime) -> Plan:
        """The window opened at the fire time: a late run, or one that waited for hosts, gets
        only what is left of it (the engine counts a window from the run's start)."""
        window = plan.runbook.window
        if window is None:
            return plan
        left = max(0.001, window - (self._clock() - fire_time).total_seconds())
        return replace(plan, runbook=plan.runbook.model_copy(update={"window": min(window, left)}))

    def _linker(self, fire_id: int) -> Callable[[Event], None]:
        """An observer that writes the run id onto the fire as soon as the run has one."""
        linked: list[str] = []

        def observe(event: Event) -> None:
            if not linked:
                linked.append(event.run_id)
                self.store.update_fire(fire_id, run_id=event.run_id)

        return observe

    def _execute_when_hosts_free(self, plan: Plan, fire_id: int, fire_time: datetime,
                                 late: bool) -> RunOutcome | None:
        """Run `plan` once no other run holds its hosts (see the module doc); None if it gave
        up waiting. `app.execute` takes the leases itself, as for a CLI run: a host taken
        between our look and the run's lease just means another turn of waiting."""
        hosts = [host.name for host in plan.hosts]
        give_up = time.monotonic() + plan.runbook.timeout
        waited = False
        while True:
            busy = self.store.busy_hosts(hosts)
            if not busy:
                try:
                    return app.execute(self.settings, self._rest_of_window(plan, fire_time),
                                       dry_run=False, observer=self._linker(fire_id),
                                       started_by="daemon (late)" if late else "daemon")
                except HostsBusy as exc:
                    busy = exc.busy
            if not waited:
                waited = True
                log.info("%s waits for hosts held by other runs: %s", plan.runbook.name, busy)
                self.store.audit("schedule.waiting_for_hosts", actor="daemon", details={
                    "runbook": plan.runbook.name, "fire": fire_id, "busy": busy})
            why = self._why_stop_waiting(plan, fire_time, give_up)
            if why is not None:
                reason = (f"hosts still in other runs when {why}: "
                          + ", ".join(f"{h} ({who})" for h, who in sorted(busy.items())))
                self.store.update_fire(fire_id, decision=SKIPPED, reason=reason)
                self._announce(plan.runbook.name, SKIPPED, reason)
                return None
            self._stopping.wait(self._lease_poll)

    def _why_stop_waiting(self, plan: Plan, fire_time: datetime, give_up: float) -> str | None:
        window = plan.runbook.window
        if window is not None and self._clock() >= fire_time + timedelta(seconds=window):
            return "its window closed"
        if self._stopping.is_set():
            return "the daemon is stopping"
        return "its timeout passed" if time.monotonic() >= give_up else None

    # ------------------------------------------------------------------------------ reports

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._http.address if self._http is not None else None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy: scheduling, not stopping, and the main loop (if running) turned recently."""
        with self._lock:
            running = sorted(self._runs)
        stale = (self._last_tick is not None
                 and time.monotonic() - self._last_tick > max(3 * self._poll_interval, 5.0))
        problem = ("stopping" if self._stopping.is_set() else
                   "scheduler not running" if not self._scheduler.running else
                   "main loop stalled" if stale else None)
        return problem is None, {"status": problem or "ok", "running": running,
                                 "scheduled": len(self._scheduler.next_fires())}

    def metrics(self) -> str:
        with self._lock:
            running = list(self._runs)
        return render_metrics(self.store.metrics(), Live(self._scheduler.next_fires(), running))

    def _status(self) -> str:
        with self._lock:
            running = sorted(self._runs)
        fires = {n: t for n, t in self._scheduler.next_fires().items() if t is not None}
        text = f"{len(fires)} runbook(s) scheduled"
        if fires:
            name, when = min(fires.items(), key=lambda item: item[1])
            text += f"; next: {name} at {when.astimezone(UTC).isoformat(timespec='minutes')}"
        return text + (f"; running: {', '.join(running)}" if running else "")

    def _announce(self, runbook: str, status: str, text: str) -> None:
        """Tell the notifiers (Slack) about a decision that is not a run; never raises."""
        message = RunMessage(run_id="", runbook=runbook, status=status, dry_run=False,
                             headline=f"maintenancebot daemon: {runbook}: {status}",
                             summary=text, details="")
        try:
            notify_all(notifiers_from_settings(self.settings, os.environ, None), message)
        except MaintenanceBotError as exc:
            log.warning("could not notify about %s (%s): %s", runbook, status, exc)


def resume_parked_runs(settings: Settings, store: RunStore) -> None:
    """Startup hook: resume runs whose hosts are parked on an approval (approvals, issue 4).

    Called once at daemon start, before anything is scheduled. It calls
    `maintenancebot.approvals.resume_waiting_runs(settings, store)` when that module and
    function exist, and does nothing otherwise."""
    try:
        approvals = importlib.import_module("maintenancebot.approvals")
    except ModuleNotFoundError as exc:
        if exc.name != "maintenancebot.approvals":
            raise
        return
    resume = getattr(approvals, "resume_waiting_runs", None)
    if resume is None:
        log.info("maintenancebot.approvals has no resume_waiting_runs: nothing resumed")
        return
    resume(settings, store)


def _lock_state_dir(state_dir: Path) -> IO[str]:
    """One daemon per state directory: two would each think they own every schedule."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / "daemon.lock", "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DaemonError(f"another maintenancebot daemon (pid {holder}) holds {state_dir}")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
