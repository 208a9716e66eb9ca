-- One audit entry per domain event (written by the `audit` job; idempotent by event id).
-- No foreign key to tenants: the record of a tenant's deletion outlives the tenant.
CREATE TABLE audit_log (
    event_id        UUID PRIMARY KEY,
    tenant_id       UUID NOT NULL,
    event_type      TEXT NOT NULL,
    subject         TEXT NOT NULL,
    actor           JSONB NOT NULL,
    correlation_id  TEXT NOT NULL,
    at              TIMESTAMPTZ NOT NULL,
    before          JSONB,
    after           JSONB,
    recorded_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at, event_id);

-- Emails sent, by their idempotency key (e.g. `welcome:<user id>`): one email per key.
CREATE TABLE email_log (
    key         TEXT PRIMARY KEY,
    tenant_id   UUID NOT NULL,
    recipient   TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    sent_at     TIMESTAMPTZ NOT NULL
);
