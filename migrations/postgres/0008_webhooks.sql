-- Webhooks (SPEC §7): a tenant's endpoints and the log of every delivery attempt.
-- `event_types` is a JSON array of exact types or `prefix.*` ([] = every event).
-- Secrets are `whsec_…` strings; the previous one keeps signing until `previous_secret_until`.

CREATE TABLE webhook_endpoints (
    id                     UUID PRIMARY KEY,
    tenant_id              UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL DEFAULT '',
    event_types            TEXT NOT NULL DEFAULT '[]',
    status                 TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
    disabled_reason        TEXT,
    secret                 TEXT NOT NULL,
    previous_secret        TEXT,
    previous_secret_until  TIMESTAMPTZ,
    created_at             TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhook_endpoints_by_tenant ON webhook_endpoints (tenant_id, id);

-- One row per attempt; at most one success per (endpoint, event): the log can never show
-- an event delivered twice.
CREATE TABLE webhook_deliveries (
    id               UUID PRIMARY KEY,
    endpoint_id      UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         UUID NOT NULL,
    event_type       TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    response_status  INTEGER,
    duration_ms      BIGINT NOT NULL,
    error            TEXT,
    at               TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE UNIQUE INDEX webhook_deliveries_one_success ON webhook_deliveries (endpoint_id, event_id)
    WHERE status = 'succeeded';
