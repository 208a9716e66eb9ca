-- Leases: which process holds a singleton role (the active outbox relay), until when.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Wake the outbox relay at once on new rows (it also polls).
CREATE FUNCTION eventra_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('eventra_outbox', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION eventra_outbox_notify();
