-- Same shape as migrations/postgres/0010. Custom events and analytics (SPEC §9).

CREATE TABLE event_types (
    tenant_id    BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    schema       TEXT NOT NULL,
    version      INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE event_keys (
    tenant_id   BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    event_id    BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX event_keys_by_age ON event_keys (created_at);

CREATE TABLE event_stats (
    tenant_id       BLOB NOT NULL,
    grain           INTEGER NOT NULL,
    bucket_start    TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    latency_bucket  INTEGER NOT NULL,
    count           INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, grain, bucket_start, event_type, latency_bucket)
);
