-- When the running job's current lease began (the dashboard's "busy since"); NULL unless running.
ALTER TABLE jobs ADD COLUMN started_at_us INTEGER;
