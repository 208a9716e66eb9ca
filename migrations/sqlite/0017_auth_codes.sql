-- Same shape as migrations/postgres/0012.
CREATE TABLE auth_codes (
    user_id     BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose     TEXT NOT NULL CHECK (purpose IN ('verify', 'reset')),
    tenant_id   BLOB NOT NULL,
    code_hash   TEXT NOT NULL,
    tries_left  INTEGER NOT NULL,
    expires_at  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (user_id, purpose)
);
