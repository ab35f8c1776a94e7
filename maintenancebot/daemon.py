"""The daemon: decides *when* runbooks run; how they run is `prepare` + `app.execute`.

Owned here: the process — one daemon per state directory, one cron job per scheduled runbook
(through `scheduling`), catching up on fires missed while it was down, reload on file change,
SIGHUP and `--git-pull` (through `watch` and `gitsync`), the systemd notify protocol, health
and metrics, and a graceful stop. The decision on each fire and the run it starts are
`firing`'s. Not here: SQL (`store`), cron parsing (`scheduling`), printing (`cli_daemon`).

Decisions come from the store, not from memory: `handled_until` per runbook says which fire
times were decided, and a fire can be claimed once (UNIQUE in SQLite). So a restart, or two,
never runs a fire twice, and a run interrupted by a crash is not re-run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from maintenancebot import app, gitsync, resume
from maintenancebot.daemon_http import Live, StatusServer, render_metrics
from maintenancebot.errors import MaintenanceBotError
from maintenancebot.firing import Firing
from maintenancebot.gitsync import SyncResult
from maintenancebot.models import Settings, format_duration
from maintenancebot.notify import RunMessage, notifiers_from_settings, notify_all
from maintenancebot.runcontrol import PROCESS_STOP
from maintenancebot.scheduling import CronScheduler
from maintenancebot.sdnotify import Notifier
from maintenancebot.store import RunStore
from maintenancebot.watch import Catalog, ChangeWatcher, load_catalog

if TYPE_CHECKING:
    from maintenancebot.notify.slack_actions import SlackInbound

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


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
        self._stopping = threading.Event()
        self._hup = False
        self._signalled: str | None = None  # SIGTERM/SIGINT seen by the handler
        self._watcher = ChangeWatcher(settings)
        self._firing: Firing | None = None
        self._announcer: _Announcer | None = None
        self._scheduler = CronScheduler(lambda name, fire: self.firing.decide(name, fire))
        self._lockfile: IO[str] | None = None
        self._store: RunStore | None = None
        self._last_ping = 0.0
        self._last_poll = 0.0
        self._resumed: list[threading.Thread] = []
        self._last_tick: float | None = None  # set by the main loop (`serve`), for /healthz
        self._listen = listen
        self._git_pull = git_pull
        self._git_reported: str | None = None  # a rejection or git error is reported once
        self._reload_lock = threading.Lock()  # the main loop and the git thread both reload
        self._http: StatusServer | None = None
        self.slack_inbound: SlackInbound | None = None  # Slack's Approve/Deny clicks come in here

    @property
    def store(self) -> RunStore:
        assert self._store is not None, "start() first"
        return self._store

    @property
    def firing(self) -> Firing:
        assert self._firing is not None, "start() first"
        return self._firing

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def next_fires(self) -> dict[str, datetime | None]:
        return self._scheduler.next_fires()

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Lock the state dir, load, catch up on missed fires, schedule, tell systemd READY."""
        self._lockfile = _lock_state_dir(Path(self.settings.state_dir).expanduser())
        self._announcer = _Announcer(self.settings)
        self._store = app.open_store(self.settings)
        self.store.audit("daemon.started", actor="daemon", details={"pid": os.getpid()})
        self._firing = Firing(self.settings, self.store, clock=self._clock,
                              catalog=lambda: self._catalog, stopping=self._stopping,
                              announce=self._announce, changed=self._status_changed,
                              lease_poll=self._lease_poll)
        self._resumed = resume_parked_runs(self.settings, self.store)
        self.reload("start", initial=True)
        self.firing.catch_up()
        self._scheduler.start()
        if self._listen is not None:
            self._http = StatusServer(self._listen, self.health, self.metrics)
            self._http.start()
        slack = self.settings.slack
        if slack is not None and (slack.interactivity_listen or slack.socket_mode):
            # Approve/Deny clicks: imported only when configured (slack_sdk is slow to load).
            from maintenancebot.notify.slack_actions import SlackInbound

            self.slack_inbound = SlackInbound.start(self.settings, self.store)
        if self._git_pull is not None:
            threading.Thread(target=self._git_loop, args=(self._git_pull,), name="git-sync",
                             daemon=True).start()
        status = self._status()
        self._notifier.ready(status)
        log.info("ready: %s", status)
        self._last_ping = time.monotonic()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT (what `maintenancebot daemon` and systemd call)."""
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.start()
        try:
            while not self._stopping.is_set() and self._signalled is None:
                # Short waits, because the signal handlers only set plain flags (see below).
                self._stopping.wait(min(self._poll_interval, 0.25))
                if self._stopping.is_set() or self._signalled is not None:
                    break
                self.tick()
        finally:
            self.stop(self._signalled or "stopped")
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
            # A CLI `run --no-wait` left its run waiting: this daemon takes it from here.
            self._resumed = [t for t in self._resumed if t.is_alive()]
            self._resumed += resume_parked_runs(self.settings, self.store)
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
        """Halt every run before its next step; `serve` then stops."""
        PROCESS_STOP.request(_stop_reason(reason))
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
        if self.slack_inbound is not None:  # no click is taken once runs detach
            self.slack_inbound.close()
            self.slack_inbound = None
        left: list[str] = []
        if self._firing is not None:
            self._firing.wait_idle(self._stop_timeout)
            left = self._firing.in_flight()
        # Resumed runs: parked hosts detach at once (the next start resumes them again);
        # a host in a step finishes it.
        deadline = time.monotonic() + self._stop_timeout
        for thread in self._resumed:
            thread.join(max(0.0, deadline - time.monotonic()))
        left += [t.name for t in self._resumed if t.is_alive()]
        self._resumed = []
        if left:
            log.error("stop timeout (%s) passed with runs in flight: %s; they will be recorded "
                      "interrupted at the next start", format_duration(self._stop_timeout), left)
        if self._announcer is not None:
            self._announcer.close(10.0)
            self._announcer = None
        if self._store is not None:
            self.store.audit("daemon.stopped", actor="daemon",
                             details={"reason": reason, "runs_left": left})
            self.store.close()
            self._store = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
        log.info("stopped (%s)", reason)
        if not left:
            PROCESS_STOP.clear()  # an in-process restart (tests) starts with a clean slate
        return not left

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run of this daemon is in flight (tests)."""
        return self.firing.wait_idle(timeout)

    # A handler runs in the main thread between two bytecodes, possibly while that thread holds
    # a lock (an Event's, the store's): handlers only assign, and the main loop does the rest.

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        PROCESS_STOP.request(_stop_reason(name))  # runs halt before their next step at once
        self._signalled = name

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

    # ------------------------------------------------------------------------------ reports

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._http.address if self._http is not None else None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy: scheduling, not stopping, and the main loop (if running) turned recently."""
        running = self.firing.running()
        stale = (self._last_tick is not None
                 and time.monotonic() - self._last_tick > max(3 * self._poll_interval, 5.0))
        problem = ("stopping" if self._stopping.is_set() else
                   "scheduler not running" if not self._scheduler.running else
                   "main loop stalled" if stale else None)
        return problem is None, {"status": problem or "ok", "running": running,
                                 "scheduled": len(self._scheduler.next_fires())}

    def metrics(self) -> str:
        running = self.firing.running()
        return render_metrics(self.store.metrics(), Live(self._scheduler.next_fires(), running))

    def _status_changed(self) -> None:
        if self._scheduler.running:  # before READY, the status would say "0 scheduled"
            self._notifier.status(self._status())

    def _status(self) -> str:
        running = self.firing.running() if self._firing is not None else []
        fires = {n: t for n, t in self._scheduler.next_fires().items() if t is not None}
        text = f"{len(fires)} runbook(s) scheduled"
        if fires:
            name, when = min(fires.items(), key=lambda item: item[1])
            text += f"; next: {name} at {when.astimezone(UTC).isoformat(timespec='minutes')}"
        return text + (f"; running: {', '.join(running)}" if running else "")

    def _announce(self, runbook: str, status: str, text: str) -> None:
        """Tell the notifiers (Slack) about a decision that is not a run; never blocks."""
        if self._announcer is not None:
            self._announcer.post(runbook, status, text)


class _Announcer:
    """Sends the daemon's own news (missed, skipped, rejected edits) from one thread, so a slow
    or failing Slack never holds up a scheduling decision, a reload or READY."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._queue: queue.Queue[RunMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="announce", daemon=True)
        self._thread.start()

    def post(self, runbook: str, status: str, text: str) -> None:
        self._queue.put(RunMessage(run_id="", runbook=runbook, status=status, dry_run=False,
                                   headline=f"maintenancebot daemon: {runbook}: {status}",
                                   summary=text, details=""))

    def close(self, timeout: float) -> None:
        """Send what is queued (for at most `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                notify_all(notifiers_from_settings(self._settings, os.environ, None), message)
            except MaintenanceBotError as exc:  # Slack configured but unusable: logged
                log.warning("could not notify about %s (%s): %s", message.runbook,
                            message.status, exc)


def _stop_reason(why: str) -> str:
    return f"daemon stopping ({why}): the step in flight finished, no further step started"


def resume_parked_runs(settings: Settings, store: RunStore) -> list[threading.Thread]:
    """Take back runs whose hosts wait on approvals with no process: left by `run --no-wait`,
    a crash or a restart of this daemon. Returns at once; each run goes on in its thread."""
    return resume.resume_waiting_runs(settings, store)


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
