-- When the job last failed: with run_at, the delay the retry schedule chose.
ALTER TABLE jobs ADD COLUMN failed_at_us INTEGER;
