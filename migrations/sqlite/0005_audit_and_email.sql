-- Same shape as migrations/postgres/0004_audit_and_email.sql.
CREATE TABLE audit_log (
    event_id        BLOB PRIMARY KEY NOT NULL,
    tenant_id       BLOB NOT NULL,
    event_type      TEXT NOT NULL,
    subject         TEXT NOT NULL,
    actor           TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    at              TEXT NOT NULL,
    before          TEXT,
    after           TEXT,
    recorded_at     TEXT NOT NULL
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at, event_id);

CREATE TABLE email_log (
    key         TEXT PRIMARY KEY NOT NULL,
    tenant_id   BLOB NOT NULL,
    recipient   TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    sent_at     TEXT NOT NULL
);
