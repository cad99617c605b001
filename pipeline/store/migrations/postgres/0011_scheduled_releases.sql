-- Records the scheduler keeps until their time: notifications held for their user's quiet hours
-- and campaigns whose send_at is later, read from `tidings.scheduled`. Times are microseconds since
-- the Unix epoch (the scheduler's clock). A released row stays (released_at set) until it is purged,
-- so a copy of its record read again is not released twice.
CREATE TABLE scheduled_releases (
    -- tidings.release-id: the notification id, or the campaign's event_id.
    release_id       text    PRIMARY KEY,
    -- Where the record was read: the owner of this tidings.scheduled partition releases it.
    source_partition integer NOT NULL,
    source_offset    bigint  NOT NULL,
    release_at       bigint  NOT NULL,
    -- The full (prefixed) topic the record is produced to.
    release_to       text    NOT NULL,
    record_key       bytea,
    record_value     bytea,
    -- The record's other headers, encoded by the scheduler stage.
    headers          bytea   NOT NULL,
    created_at       bigint  NOT NULL,
    released_at      bigint
);
-- The due rows of a partition, in release order; released rows leave the index.
CREATE INDEX scheduled_releases_due ON scheduled_releases (source_partition, release_at) WHERE released_at IS NULL;
-- The purge of released rows, oldest first.
CREATE INDEX scheduled_releases_released ON scheduled_releases (released_at) WHERE released_at IS NOT NULL;
