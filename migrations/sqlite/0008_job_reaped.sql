-- How often a job's worker died under it (lease lapsed): a job that keeps taking its
-- worker down is buried after `jobs::MAX_REAPS` instead of looping forever.
ALTER TABLE jobs ADD COLUMN reaped INTEGER NOT NULL DEFAULT 0;
