-- The relay's wake-up moves out of the writing transactions: a NOTIFY inside a
-- transaction takes a database-wide lock at commit and holds it through the commit's
-- WAL flush, so every writing transaction committed one after another (no group
-- commit). Writers now send `pg_notify('eventra_outbox', '')` after their commit, in a
-- statement of its own (one in flight per process; a burst of commits costs one).
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS eventra_outbox_notify();
