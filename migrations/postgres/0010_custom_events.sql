-- Custom events and analytics (SPEC §9).

-- A tenant's own event types, each with the JSON Schema 2020-12 its events' data must
-- satisfy. `version` is +1 on every replacement: compiled schemas are cached by it.
CREATE TABLE event_types (
    tenant_id    UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    schema       TEXT NOT NULL,
    version      BIGINT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

-- The ids clients gave their events (idempotent ingestion), kept as long as
-- idempotency records.
CREATE TABLE event_keys (
    tenant_id   UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    event_id    UUID NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX event_keys_by_age ON event_keys (created_at);

-- Processed events per tenant, type and time bucket (grain 0 = minute, 1 = hour,
-- 2 = day), by commit → processed latency bucket (a log-scale histogram, mergeable by
-- adding counts). Written in the audit entry's transaction, for new entries only:
-- exactly once per event.
CREATE TABLE event_stats (
    tenant_id       UUID NOT NULL,
    grain           SMALLINT NOT NULL,
    bucket_start    TIMESTAMPTZ NOT NULL,
    event_type      TEXT NOT NULL,
    latency_bucket  SMALLINT NOT NULL,
    count           BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, grain, bucket_start, event_type, latency_bucket)
);

-- What was audited before analytics existed counts as processed (grain 3: all time),
-- so a tenant's backlog (event_seq - processed) starts right.
INSERT INTO event_stats (tenant_id, grain, bucket_start, event_type, latency_bucket, count)
SELECT tenant_id, 3, TIMESTAMPTZ '1970-01-01 00:00:00+00', event_type, 0, COUNT(*)
FROM audit_log GROUP BY tenant_id, event_type;
