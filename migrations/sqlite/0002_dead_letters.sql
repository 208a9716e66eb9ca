-- Messages parked by a supervisor after they crashed their handler too often.
CREATE TABLE dead_letters (
    id          BLOB PRIMARY KEY NOT NULL,
    source      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    failures    INTEGER NOT NULL,
    parked_at   TEXT NOT NULL
);
