-- Requests a second per API key of the tenant (SPEC §8); 0: no limit.
ALTER TABLE tenants ADD COLUMN rate_limit_per_second BIGINT NOT NULL DEFAULT 0;
