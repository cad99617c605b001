-- SQLite twin of the PostgreSQL migration (integer for bigint).
-- Every executed replay and dead-letter re-drive (`tidings replay`, `tidings dlq replay`): who ran it,
-- when, what it covers, and where it got to, so the same command resumes where it stopped and
-- `tidings replay list` shows the history. Times are microseconds since the Unix epoch.
CREATE TABLE replays (
    replay_id   text   PRIMARY KEY,
    -- 'replay' or 'dlq'.
    kind        text   NOT NULL,
    -- What identifies "the same command" for a resume: a hash of topic, stage, plan and filters.
    fingerprint text   NOT NULL,
    started_by  text   NOT NULL,
    started_at  integer NOT NULL,
    updated_at  integer NOT NULL,
    finished_at integer,
    -- running, done, stopped (Ctrl-C), failed.
    outcome     text   NOT NULL,
    topic       text   NOT NULL,
    stage       text,
    -- JSON: the plan ({partition: [start, end)} resolved once), the filters, the per-partition
    -- next offsets reached, and the counts (read, written, present, dead-lettered, ...).
    plan        text   NOT NULL,
    filters     text   NOT NULL DEFAULT '{}',
    progress    text   NOT NULL DEFAULT '{}',
    counts      text   NOT NULL DEFAULT '{}'
);
CREATE INDEX replays_fingerprint ON replays (fingerprint, started_at);
CREATE INDEX replays_started ON replays (started_at, replay_id);
