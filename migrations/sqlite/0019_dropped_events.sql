-- Events an operator discarded from the dead-letter queue before they were processed:
-- they will never be counted as processed, so a tenant's backlog (event_seq - processed)
-- leaves them out (the ones processed after all, by another copy, are not left out twice).
CREATE TABLE dropped_events (
    event_id   BLOB PRIMARY KEY NOT NULL,
    tenant_id  BLOB NOT NULL,
    dropped_at TEXT NOT NULL
);
CREATE INDEX dropped_events_by_tenant ON dropped_events (tenant_id);
