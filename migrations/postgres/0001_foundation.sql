-- Tenants, API keys, users, idempotency records and the transactional outbox.
-- See src/store/sql.rs for the locking protocol these tables support.

CREATE TABLE tenants (
    id          UUID PRIMARY KEY,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    max_users   BIGINT NOT NULL DEFAULT 0 CHECK (max_users >= 0),
    user_count  BIGINT NOT NULL DEFAULT 0 CHECK (user_count >= 0),
    -- last event number handed out for this tenant (gap-free, see outbox.tenant_seq)
    event_seq   BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE api_keys (
    id          UUID PRIMARY KEY,
    tenant_id   UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'writer', 'reader')),
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

CREATE TABLE users (
    id                UUID PRIMARY KEY,
    tenant_id         UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email             TEXT NOT NULL,
    email_normalized  TEXT NOT NULL,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    email_verified    BOOLEAN NOT NULL DEFAULT FALSE,
    attributes        JSONB NOT NULL DEFAULT '{}',
    version           BIGINT NOT NULL CHECK (version >= 1),
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    CONSTRAINT users_email_unique UNIQUE (tenant_id, email_normalized)
);
CREATE UNIQUE INDEX users_by_tenant ON users (tenant_id, id);

CREATE TABLE idempotency_keys (
    tenant_id     UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    response      JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

-- No foreign key to tenants: a tenant.deleted event outlives its tenant.
CREATE TABLE outbox (
    seq           BIGSERIAL PRIMARY KEY,
    event_id      UUID NOT NULL UNIQUE,
    tenant_id     UUID NOT NULL,
    tenant_seq    BIGINT NOT NULL,
    event_type    TEXT NOT NULL,
    payload       JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    published_at  TIMESTAMPTZ,
    CONSTRAINT outbox_tenant_order UNIQUE (tenant_id, tenant_seq)
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
