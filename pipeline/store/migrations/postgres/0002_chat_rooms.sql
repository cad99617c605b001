-- Chat rooms as the gateway's chat API creates them: the API writes rooms and membership here (the
-- only way to change them) and then produces the event on `chat`. Times are microseconds since the
-- Unix epoch (bigint) on both backends.
CREATE TABLE chat_rooms (
    room_id    text    PRIMARY KEY,
    kind       text    NOT NULL,
    name       text    NOT NULL,
    creator_id text    NOT NULL,
    product_id text,
    closed     boolean NOT NULL DEFAULT false,
    created_at bigint  NOT NULL
);

-- Group rooms are found by tags (all the asked tags).
CREATE TABLE chat_room_tags (
    tag     text NOT NULL,
    room_id text NOT NULL,
    PRIMARY KEY (tag, room_id)
);

-- How far each member has read (a message seq; -1: nothing), and since when they are a member.
ALTER TABLE room_members ADD COLUMN read_seq bigint NOT NULL DEFAULT -1;
ALTER TABLE room_members ADD COLUMN joined_at bigint NOT NULL DEFAULT 0;
CREATE INDEX room_members_user ON room_members (user_id);

-- A message's seq in its room is its offset on the room's `chat` partition; edits and deletes
-- arrive later on the same partition.
ALTER TABLE chat_messages ADD COLUMN edited_at bigint;
ALTER TABLE chat_messages ADD COLUMN deleted boolean NOT NULL DEFAULT false;
CREATE INDEX chat_messages_room_seq ON chat_messages (room_id, source_offset);
