-- Expired idempotency records are purged by age.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
