-- Per-connection staging tables that binary COPY loads before the de-duplicating INSERT … SELECT.
-- Column order is the COPY field order of the encoder in postgres.rs. ON COMMIT DELETE ROWS empties
-- them at the end of every write transaction, so they can be reused by the connection's next batch.
CREATE TEMP TABLE IF NOT EXISTS notifications_staging (
    id               uuid,
    user_id          text,
    kind             text,
    title            text,
    body             text,
    link             text,
    source_event_id  text,
    occurred_at      timestamptz,
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    stream_partition integer,
    stream_offset    bigint,
    category         text
) ON COMMIT DELETE ROWS;

CREATE TEMP TABLE IF NOT EXISTS chat_staging (
    message_id       text,
    room_id          text,
    sender_id        text,
    text             text,
    occurred_at      timestamptz,
    source_partition integer,
    source_offset    bigint
) ON COMMIT DELETE ROWS;

CREATE TEMP TABLE IF NOT EXISTS users_staging (
    user_id text
) ON COMMIT DELETE ROWS;
