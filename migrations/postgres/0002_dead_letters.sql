-- Messages parked by a supervisor after they crashed their handler too often.
CREATE TABLE dead_letters (
    id          UUID PRIMARY KEY,
    source      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    payload     JSONB NOT NULL,
    reason      TEXT NOT NULL,
    failures    BIGINT NOT NULL,
    parked_at   TIMESTAMPTZ NOT NULL
);
