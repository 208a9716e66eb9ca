-- An event's attempts at one endpoint, in order: what `status=pending` (the latest
-- attempt failed and another is due) and recover look up per (endpoint, event).
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (endpoint_id, event_id, id);
