-- The embedded job queue (src/jobs/sqlite.rs). Times are microseconds since the epoch.
CREATE TABLE jobs (
    id               BLOB PRIMARY KEY NOT NULL,
    kind             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    args             TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL CHECK (state IN ('ready', 'scheduled', 'running', 'retry', 'dead', 'done')),
    failures         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    enqueued_at_us   INTEGER NOT NULL,
    run_at_us        INTEGER NOT NULL,
    worker           TEXT,
    lease_id         BLOB,
    lease_until_us   INTEGER,
    last_error       TEXT,
    finished_at_us   INTEGER
);
CREATE INDEX jobs_ready ON jobs (queue, run_at_us, id) WHERE state = 'ready';
CREATE INDEX jobs_due ON jobs (run_at_us) WHERE state IN ('scheduled', 'retry');
CREATE INDEX jobs_leases ON jobs (lease_until_us) WHERE state = 'running';
CREATE INDEX jobs_dead ON jobs (finished_at_us) WHERE state = 'dead';
