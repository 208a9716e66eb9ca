-- End-user authentication (SPEC §8).

-- A user's password: an Argon2id PHC string (its parameters are in it, so they can be
-- raised and old hashes upgraded at the next sign-in). Never read with the user.
ALTER TABLE users ADD COLUMN password_hash TEXT;

-- Keys that sign access tokens (Ed25519), shared by every process. The newest unretired
-- key signs; retired keys stay published in the JWKS until their tokens expired.
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    -- PKCS#8 document of the key pair.
    private_key  BYTEA NOT NULL,
    public_key   BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    retired_at   TIMESTAMPTZ
);

-- One session per sign-in: the family of its refresh tokens.
CREATE TABLE auth_sessions (
    id            UUID PRIMARY KEY,
    tenant_id     UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id       UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    TIMESTAMPTZ NOT NULL,
    last_used_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    user_agent    TEXT NOT NULL DEFAULT '',
    ip            TEXT NOT NULL DEFAULT '',
    revoked_at    TIMESTAMPTZ,
    revoked_reason TEXT
);
CREATE INDEX auth_sessions_by_user ON auth_sessions (tenant_id, user_id, created_at);

-- Refresh tokens by SHA-256 (never the token). A spent one is kept while its session
-- lives, so presenting it again is recognised as reuse.
CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    session_id  UUID NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL,
    spent_at    TIMESTAMPTZ
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);
