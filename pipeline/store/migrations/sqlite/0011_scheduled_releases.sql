-- SQLite twin of the PostgreSQL migration (integer for bigint, blob for bytea).
-- Records the scheduler keeps until their time: notifications held for their user's quiet hours
-- and campaigns whose send_at is later, read from `tidings.scheduled`. Times are microseconds since
-- the Unix epoch (the scheduler's clock). A released row stays (released_at set) until it is purged,
-- so a copy of its record read again is not released twice.
CREATE TABLE scheduled_releases (
    -- tidings.release-id: the notification id, or the campaign's event_id.
    release_id       text    PRIMARY KEY,
    -- Where the record was read: the owner of this tidings.scheduled partition releases it.
    source_partition integer NOT NULL,
    source_offset    integer NOT NULL,
    release_at       integer NOT NULL,
    -- The full (prefixed) topic the record is produced to.
    release_to       text    NOT NULL,
    record_key       blob,
    record_value     blob,
    -- The record's other headers, encoded by the scheduler stage.
    headers          blob    NOT NULL,
    created_at       integer NOT NULL,
    released_at      integer
);
-- The due rows of a partition, in release order; released rows leave the index.
CREATE INDEX scheduled_releases_due ON scheduled_releases (source_partition, release_at) WHERE released_at IS NULL;
-- The purge of released rows, oldest first.
CREATE INDEX scheduled_releases_released ON scheduled_releases (released_at) WHERE released_at IS NOT NULL;
