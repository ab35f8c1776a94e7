"""Each fire of a schedule: the decision (run, run late, skip, miss), its record, and the run.

Owned here: turning one fire time into exactly one recorded decision — from the store, so a
restart or a second daemon can never decide (and run) it again — and carrying out a `started`
or `late` fire in its own thread: waiting for busy hosts, the rest of the window, the run
itself through `app.execute` (the CLI's code path). Not here: when fires happen (`scheduling`),
which runbooks exist (`watch`), the process and its signals (`daemon`).

Busy hosts: every real run leases all its hosts at once (`app.execute`, so CLI runs too; two
waiting runs cannot deadlock). A scheduled run whose hosts another run holds *waits* for them —
maintenance that was due should happen — until its `window` closes (or its `timeout` passes);
then the fire is recorded `skipped` with the holders. Waiting and giving up are both recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from maintenancebot import app
from maintenancebot.engine import RunOutcome
from maintenancebot.errors import ConfigError, HostsBusy, MaintenanceBotError
from maintenancebot.models import Settings, format_duration
from maintenancebot.plan import Plan, build_plan
from maintenancebot.prepare import prepare
from maintenancebot.runcontrol import Event
from maintenancebot.scheduling import fire_times_between
from maintenancebot.states import RunStatus
from maintenancebot.store import RunStore
from maintenancebot.watch import Accepted, Catalog

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Announce = Callable[[str, str, str], None]  # (runbook, status, text) -> notifiers
STARTED, LATE, SKIPPED, MISSED, FAILED = "started", "late", "skipped", "missed", "failed"
OLDER_MISSES_RECORDED = 100  # a month-long outage of an every-minute runbook stays bounded
MISSED_LOOKBACK = timedelta(days=31)


class Firing:
    def __init__(
        self, settings: Settings, store: RunStore, *, clock: Clock,
        catalog: Callable[[], Catalog], stopping: threading.Event, announce: Announce,
        changed: Callable[[], None], lease_poll: float,
    ) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self._catalog = catalog
        self._stopping = stopping
        self._announce = announce
        self._changed = changed  # what runs changed: the daemon updates systemd's STATUS
        self._lease_poll = lease_poll
        self._lock = threading.RLock()
        self._runs: dict[str, threading.Thread] = {}

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._runs)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run started here is in flight; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._runs.values())
            if not threads:
                return True
            threads[0].join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return not self._runs

    def in_flight(self) -> list[str]:
        with self._lock:
            return [t.name for t in self._runs.values() if t.is_alive()]

    def catch_up(self) -> None:
        """At start: fires missed while the daemon was down, from the store's records."""
        now = self._clock()
        for name, entry in sorted(self._catalog().runbooks.items()):
            book = entry.runbook
            if book.schedule is None:
                continue
            mark = self.store.handled_until(name)
            if mark is None:  # never scheduled before: nothing can have been missed
                self.store.set_handled_until(name, now)
                continue
            # A month back is plenty to report; an every-minute runbook down for a year would
            # otherwise cost half a million trigger steps before READY.
            missed = fire_times_between(book.schedule, book.timezone,
                                        max(mark, now - MISSED_LOOKBACK), now)
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
            entry = self._catalog().runbooks.get(name)
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
        self._changed()

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
            self._changed()

    def _plan(self, entry: Accepted) -> Plan:
        """The plan from the files as they are; if they are invalid now, from the last valid
        version (the run records which content it ran, by hash)."""
        try:
            return prepare(self.settings, str(entry.path), None, None)
        except (ConfigError, OSError) as exc:
            inventory = self._catalog().inventory
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
