-- SQLite twin of the PostgreSQL schema: timestamps are integer microseconds since the Unix epoch, ids are text.
-- Notifications as the persistence stage stores them. `id` is the deterministic notification id, so
-- replays and redeliveries collapse onto one row (INSERT ... ON CONFLICT (id) DO NOTHING).
CREATE TABLE notifications (
    id               text        PRIMARY KEY,
    user_id          text        NOT NULL,
    kind             text        NOT NULL,
    title            text        NOT NULL,
    body             text        NOT NULL,
    link             text,
    source_event_id  text        NOT NULL,
    occurred_at      integer     NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    -- Position of the notification itself on the `notifications` topic (the SSE stream position).
    stream_partition integer     NOT NULL,
    stream_offset    bigint      NOT NULL,
    stored_at        integer     NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    read_at          integer       
);
CREATE INDEX notifications_user_inbox ON notifications (user_id, stream_partition, stream_offset);

-- Chat room history, written from the `chat` topic.
CREATE TABLE chat_messages (
    message_id       text        PRIMARY KEY,
    room_id          text        NOT NULL,
    sender_id        text        NOT NULL,
    text             text        NOT NULL,
    occurred_at      integer     NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL
);
CREATE INDEX chat_messages_room ON chat_messages (room_id, occurred_at);

-- Next offset to consume per (consumer group, topic, partition); written in the same transaction as
-- the rows, so it is the source of truth on partition assignment (Kafka commits only feed lag).
CREATE TABLE sink_offsets (
    consumer    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);

-- Chat room membership as the templating stage learns it from the chat topic.
CREATE TABLE room_members (
    room_id text NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

-- Named campaign audiences (CampaignLaunched with a SegmentAudience).
CREATE TABLE audience_segments (
    segment text NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (segment, user_id)
);

-- The embedded schema registry.
CREATE TABLE registry_schemas (
    id          integer PRIMARY KEY,
    schema_type text    NOT NULL DEFAULT 'AVRO',
    schema      text    NOT NULL,
    canonical   text    NOT NULL UNIQUE
);
CREATE TABLE registry_versions (
    subject   text    NOT NULL,
    version   integer NOT NULL,
    schema_id integer NOT NULL REFERENCES registry_schemas (id),
    deleted   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, version)
);
CREATE TABLE registry_config (
    subject       text PRIMARY KEY, -- '' is the global level
    compatibility text NOT NULL
);
