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

-- What was audited before analytics existed counts as processed (grain 3: all time),
-- so a tenant's backlog (event_seq - processed) starts right.
INSERT INTO event_stats (tenant_id, grain, bucket_start, event_type, latency_bucket, count)
SELECT tenant_id, 3, '1970-01-01 00:00:00+00:00', event_type, 0, COUNT(*)
FROM audit_log GROUP BY tenant_id, event_type;
