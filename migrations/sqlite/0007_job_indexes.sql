-- Counts per state (the scheduler's gauges, the admin summary) and the purge of done
-- rows past their retention, without scanning the table.
CREATE INDEX jobs_state ON jobs (state, finished_at_us);
