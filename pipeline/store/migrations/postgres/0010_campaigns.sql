-- Campaigns: their definitions (written by the campaign API and `tidings campaign launch`), the
-- templating stage's fan-out progress (its checkpoint, so a restart resumes where it stopped), and
-- how many of a campaign's notifications each gateway wrote to a stream. Times are microseconds
-- since the Unix epoch.

-- The locale a user's campaign texts are picked by (null: the campaign's default).
ALTER TABLE user_preferences ADD COLUMN locale text;

CREATE TABLE campaigns (
    campaign_id       text   PRIMARY KEY,
    event_id          text   NOT NULL,
    category          text   NOT NULL,
    -- The launch request as JSON, as `show` prints it.
    definition        text   NOT NULL,
    send_at           bigint,
    created_at        bigint NOT NULL,
    launched_by       text   NOT NULL,
    -- The dry run's count when it was launched (after opt-outs).
    audience_estimate bigint,
    cancelled_at      bigint
);
CREATE INDEX campaigns_created ON campaigns (created_at, campaign_id);

-- Written by templating only after a page's notifications are acknowledged by the brokers.
CREATE TABLE campaign_progress (
    campaign_id      text   PRIMARY KEY,
    event_id         text   NOT NULL,
    -- The audience is merged in user id order: the last user id whose notification is acknowledged.
    cursor           text,
    -- JSON {segment: version}: the versions pinned when the fan-out started.
    segment_versions text   NOT NULL DEFAULT '{}',
    produced         bigint NOT NULL DEFAULT 0,
    held             bigint NOT NULL DEFAULT 0,
    suppressed       bigint NOT NULL DEFAULT 0,
    started_at       bigint NOT NULL,
    updated_at       bigint NOT NULL,
    finished_at      bigint,
    cancelled_at     bigint
);

CREATE TABLE campaign_deliveries (
    campaign_id text   NOT NULL,
    instance    text   NOT NULL,
    delivered   bigint NOT NULL,
    updated_at  bigint NOT NULL,
    PRIMARY KEY (campaign_id, instance)
);

-- A campaign's stored count (its status) visits only campaign rows; other rows pay nothing.
CREATE INDEX notifications_campaign ON notifications (source_event_id) WHERE kind = 'campaign';
