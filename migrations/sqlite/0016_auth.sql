-- Same shape as migrations/postgres/0011. End-user authentication (SPEC §8).

ALTER TABLE users ADD COLUMN password_hash TEXT;

CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    private_key  BLOB NOT NULL,
    public_key   BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    retired_at   TEXT
);

CREATE TABLE auth_sessions (
    id            BLOB PRIMARY KEY,
    tenant_id     BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id       BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    user_agent    TEXT NOT NULL DEFAULT '',
    ip            TEXT NOT NULL DEFAULT '',
    revoked_at    TEXT,
    revoked_reason TEXT
);
CREATE INDEX auth_sessions_by_user ON auth_sessions (tenant_id, user_id, created_at);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    session_id  BLOB NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    spent_at    TEXT
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);
