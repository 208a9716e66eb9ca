-- One-time codes of email verification and password reset (SPEC §8): 6 digits, kept
-- only as an HMAC under the server's secret, valid 15 minutes and 5 tries. A new code
-- for the same (user, purpose) replaces the old one.
CREATE TABLE auth_codes (
    user_id     UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose     TEXT NOT NULL CHECK (purpose IN ('verify', 'reset')),
    tenant_id   UUID NOT NULL,
    code_hash   TEXT NOT NULL,
    tries_left  INTEGER NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, purpose)
);
