-- Same as migrations/postgres/0013.
ALTER TABLE tenants ADD COLUMN rate_limit_per_second INTEGER NOT NULL DEFAULT 0;
