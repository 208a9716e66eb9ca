-- Supervisor-parked messages are gone: consumers park into the event bus's DLQ and
-- workers bury poison jobs in the dead set (one DLQ story, /v1/admin/dlq).
DROP TABLE IF EXISTS dead_letters;
