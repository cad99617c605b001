-- Audience segments as versions: a replace loads a new version beside the current one and switches
-- `segments.version` in one transaction, so a reader that pinned a version (templating paging a
-- campaign's audience) reads all of one version, never a mix. A replaced version stays for a while
-- for readers still paging it (`retired_at`), then is deleted. Times are microseconds since the
-- Unix epoch (bigint) on both backends.
CREATE TABLE segment_versions (
    -- AUTOINCREMENT: an id is never reused, so a reader's pinned version is never another's.
    id         integer PRIMARY KEY AUTOINCREMENT,
    segment    text    NOT NULL,
    created_at bigint  NOT NULL,
    -- Set when the version stops being current (replaced or deleted); NULL while loading or current.
    retired_at bigint
);

-- The members of every version; the primary key serves paging one version in user order.
CREATE TABLE segment_members (
    version bigint NOT NULL,
    user_id text   NOT NULL,
    PRIMARY KEY (version, user_id)
) WITHOUT ROWID;

-- Each segment's current version, kept with its size so `list` and `show` count nothing.
CREATE TABLE segments (
    name       text   PRIMARY KEY,
    version    bigint NOT NULL,
    size       bigint NOT NULL,
    updated_at bigint NOT NULL
);

-- The members loaded before versions: each segment becomes its first version.
INSERT INTO segment_versions (segment, created_at)
SELECT DISTINCT segment, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) FROM audience_segments;
INSERT INTO segment_members (version, user_id)
SELECT v.id, a.user_id FROM audience_segments a JOIN segment_versions v ON v.segment = a.segment;
INSERT INTO segments (name, version, size, updated_at)
SELECT v.segment, v.id, count(*), v.created_at FROM segment_versions v JOIN segment_members m ON m.version = v.id
GROUP BY v.segment, v.id, v.created_at;
DROP TABLE audience_segments;
