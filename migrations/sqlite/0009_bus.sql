-- The embedded event bus (src/bus/sqlite.rs): one queue of messages, each ready,
-- delivered (to a consumer, until `visible_at_us`) or parked (the dead-letter queue).
CREATE TABLE bus_messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL,
    routing_key     TEXT NOT NULL,
    body            BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('ready', 'delivered', 'parked')),
    deliveries      INTEGER NOT NULL DEFAULT 0,
    consumer        TEXT,
    visible_at_us   INTEGER,
    reason          TEXT,
    published_at_us INTEGER NOT NULL,
    parked_at_us    INTEGER
);
CREATE INDEX bus_ready ON bus_messages (seq) WHERE state = 'ready';
CREATE INDEX bus_delivered ON bus_messages (visible_at_us) WHERE state = 'delivered';
CREATE INDEX bus_parked ON bus_messages (parked_at_us, seq) WHERE state = 'parked';
