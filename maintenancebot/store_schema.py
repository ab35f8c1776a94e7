"""The run store's schema: one SQL script per version, applied in order by `RunStore`.

Data, not code: `store` runs these scripts and records the version in `PRAGMA user_version`.
"""

# Each entry moves the schema one version up; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_path  TEXT,
        runbook_hash  TEXT,
        git_commit    TEXT,
        git_dirty     INTEGER,
        dry_run       INTEGER NOT NULL,
        status        TEXT NOT NULL,
        started_by    TEXT,
        selection     TEXT,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        reason        TEXT,
        controller    TEXT,
        pid           INTEGER,
        proc_start    TEXT,
        boot_id       TEXT,
        meta          TEXT,
        summary_text  TEXT,
        summary_source TEXT,
        notify_state  TEXT,
        notify_error  TEXT
    );
    CREATE INDEX runs_by_start ON runs(started_at);
    CREATE INDEX runs_by_runbook ON runs(runbook, started_at);
    CREATE INDEX runs_by_status ON runs(status);

    CREATE TABLE hosts (
        run_id      TEXT NOT NULL REFERENCES runs(id),
        host        TEXT NOT NULL,
        address     TEXT,
        position    INTEGER NOT NULL,
        status      TEXT NOT NULL,
        error       TEXT,
        started_at  TEXT,
        finished_at TEXT,
        PRIMARY KEY (run_id, host)
    );

    CREATE TABLE steps (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      TEXT NOT NULL REFERENCES runs(id),
        host        TEXT NOT NULL,
        idx         INTEGER NOT NULL,
        name        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        command     TEXT,
        status      TEXT NOT NULL,
        rc          INTEGER,
        changed     INTEGER,
        stdout_tail TEXT,
        stderr_tail TEXT,
        error       TEXT,
        started_at  TEXT,
        finished_at TEXT,
        details     TEXT
    );
    CREATE INDEX steps_by_run ON steps(run_id, host, id);
    CREATE INDEX steps_by_status ON steps(status);

    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL,
        action  TEXT NOT NULL,
        run_id  TEXT,
        host    TEXT,
        actor   TEXT,
        details TEXT
    );
    CREATE INDEX audit_by_run ON audit(run_id, id);
    -- Append-only: the trail of who did what must survive whoever wants to rewrite it.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;

    CREATE TABLE control (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        by    TEXT,
        at    TEXT NOT NULL
    );

    CREATE TABLE llm_usage (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id            TEXT NOT NULL,
        at                TEXT NOT NULL,
        day               TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL
    );
    CREATE INDEX llm_usage_by_day ON llm_usage(day);
    CREATE INDEX llm_usage_by_run ON llm_usage(run_id);
    """,
    # The daemon's schedule. `schedule_state.handled_until` is the newest fire time of each
    # runbook that has a decision, so a restart knows what it missed without in-memory state;
    # UNIQUE(runbook, fire_time) makes a second decision on one fire (a restart, a second
    # daemon) fail in SQLite instead of running the runbook twice. `host_leases` keeps a host
    # out of two daemon runs at once; the holder's pid/start time/boot id let a dead holder's
    # lease be reclaimed.
    """
    CREATE TABLE schedule_state (
        runbook       TEXT PRIMARY KEY,
        handled_until TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );

    CREATE TABLE schedule_fires (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        runbook    TEXT NOT NULL,
        fire_time  TEXT NOT NULL,
        decided_at TEXT NOT NULL,
        decision   TEXT NOT NULL,
        reason     TEXT,
        run_id     TEXT,
        UNIQUE (runbook, fire_time)
    );
    CREATE INDEX schedule_fires_by_decided ON schedule_fires(decided_at);

    CREATE TABLE host_leases (
        host        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        runbook     TEXT NOT NULL,
        controller  TEXT,
        pid         INTEGER NOT NULL,
        proc_start  TEXT,
        boot_id     TEXT,
        acquired_at TEXT NOT NULL
    );
    """,
    # Approval gates (DESIGN §5). A request groups the hosts parked at one step of one run;
    # each host has its own decision (approve may release a subset) and the digest of what it
    # would run, so an answer binds to what was shown. Every vote is kept, counted or not.
    # `slack_seen` remembers signed Slack deliveries so a replay is refused.
    """
    CREATE TABLE approvals (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      TEXT NOT NULL REFERENCES runs(id),
        runbook     TEXT NOT NULL,
        step_index  INTEGER NOT NULL,
        step_name   TEXT NOT NULL,
        status      TEXT NOT NULL,
        quorum      INTEGER NOT NULL,
        on_deny     TEXT NOT NULL,
        started_by  TEXT,
        rollback    TEXT,
        opened_at   TEXT NOT NULL,
        deadline    TEXT NOT NULL,
        remind_at   TEXT,
        reminded_at TEXT,
        closed_at   TEXT,
        closed_noticed INTEGER NOT NULL DEFAULT 0,
        notice      TEXT
    );
    CREATE INDEX approvals_by_status ON approvals(status);
    CREATE INDEX approvals_by_run ON approvals(run_id, step_index);

    CREATE TABLE approval_hosts (
        approval_id INTEGER NOT NULL REFERENCES approvals(id),
        host        TEXT NOT NULL,
        step_row    INTEGER,
        digest      TEXT NOT NULL,
        command     TEXT,
        why         TEXT,
        preview     TEXT,
        decision    TEXT,
        decided_at  TEXT,
        decided_by  TEXT,
        channel     TEXT,
        reason      TEXT,
        PRIMARY KEY (approval_id, host)
    );

    CREATE TABLE approval_votes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        approval_id INTEGER NOT NULL REFERENCES approvals(id),
        host        TEXT NOT NULL,
        vote        TEXT NOT NULL,
        voter       TEXT NOT NULL,
        channel     TEXT NOT NULL,
        at          TEXT NOT NULL,
        reason      TEXT,
        counted     INTEGER NOT NULL
    );
    CREATE INDEX approval_votes_by_request ON approval_votes(approval_id, host);

    CREATE TABLE slack_seen (
        key TEXT PRIMARY KEY,
        at  TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
