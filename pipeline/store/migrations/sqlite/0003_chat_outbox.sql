-- Chat events whose store change is committed but whose produce is not yet acknowledged: written in
-- the same transaction as the room or membership change, deleted once the event is on `chat`. The
-- gateway produces a room's rows in id order (on the request, on its retry, or by its relay), so an
-- event is never lost to a failed produce, even across a crash. `event` is the event's JSON.
CREATE TABLE chat_outbox (
    id         integer PRIMARY KEY AUTOINCREMENT,
    room_id    text    NOT NULL,
    event      text    NOT NULL,
    created_at bigint  NOT NULL
);
CREATE INDEX chat_outbox_room ON chat_outbox (room_id, id);
