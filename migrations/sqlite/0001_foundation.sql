-- Tenants, API keys, users, idempotency records and the transactional outbox.
-- Same shape as migrations/postgres; UUIDs are 16-byte BLOBs, times RFC 3339 TEXT,
-- JSON is TEXT. See src/store/sql.rs for the locking protocol.

CREATE TABLE tenants (
    id          BLOB PRIMARY KEY NOT NULL,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    max_users   INTEGER NOT NULL DEFAULT 0 CHECK (max_users >= 0),
    user_count  INTEGER NOT NULL DEFAULT 0 CHECK (user_count >= 0),
    event_seq   INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id          BLOB PRIMARY KEY NOT NULL,
    tenant_id   BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'writer', 'reader')),
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

CREATE TABLE users (
    id                BLOB PRIMARY KEY NOT NULL,
    tenant_id         BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email             TEXT NOT NULL,
    email_normalized  TEXT NOT NULL,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    email_verified    INTEGER NOT NULL DEFAULT 0,
    attributes        TEXT NOT NULL DEFAULT '{}',
    version           INTEGER NOT NULL CHECK (version >= 1),
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    CONSTRAINT users_email_unique UNIQUE (tenant_id, email_normalized)
);
CREATE UNIQUE INDEX users_by_tenant ON users (tenant_id, id);

CREATE TABLE idempotency_keys (
    tenant_id     BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    response      TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      BLOB NOT NULL UNIQUE,
    tenant_id     BLOB NOT NULL,
    tenant_seq    INTEGER NOT NULL,
    event_type    TEXT NOT NULL,
    payload       TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    published_at  TEXT,
    CONSTRAINT outbox_tenant_order UNIQUE (tenant_id, tenant_seq)
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
