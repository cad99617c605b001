-- Notification categories (topology.yaml `categories`) and each user's preferences. Rows stored
-- before categories existed keep the empty category.
ALTER TABLE notifications ADD COLUMN category text NOT NULL DEFAULT '';

-- One row per user who saved preferences; a user without one has the defaults (no opt-out, UTC,
-- no quiet hours). Quiet hours are minutes after local midnight; the window may wrap midnight.
CREATE TABLE user_preferences (
    user_id     text    PRIMARY KEY,
    time_zone   text    NOT NULL,
    quiet_start integer,
    quiet_end   integer,
    updated_at  bigint  NOT NULL
);

-- Categories a user opted out of. Keyed by category first: templating asks, for one category, which
-- of a page of recipients opted out, in one index range per category.
CREATE TABLE user_opt_outs (
    category text NOT NULL,
    user_id  text NOT NULL,
    PRIMARY KEY (category, user_id)
) WITHOUT ROWID;
CREATE INDEX user_opt_outs_user ON user_opt_outs (user_id);
