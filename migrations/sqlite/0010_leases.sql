-- Same shape as migrations/postgres/0005_relay.sql (SQLite wakes its relay in-process).
CREATE TABLE leases (
    name        TEXT PRIMARY KEY NOT NULL,
    holder      TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
