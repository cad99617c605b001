-- The claim stage's state, committed with its consumed offset in one transaction per batch.
-- claim_partitions: per `coupon-claims` partition, the owner's epoch (bumped on every assignment;
-- a batch commits only while its epoch is current, so a stale owner can never commit) and the
-- next offset to decide. The other tables are the decisions' state, keyed by coupon; `partition`
-- is the coupon's partition, from which an owner loads what it decides on.
CREATE TABLE claim_partitions (
    consumer    text    NOT NULL,
    partition   integer NOT NULL,
    epoch       bigint  NOT NULL,
    next_offset bigint,
    PRIMARY KEY (consumer, partition)
);
CREATE TABLE coupon_definitions (
    coupon_id        text    PRIMARY KEY,
    partition        integer NOT NULL,
    title            text    NOT NULL,
    discount_percent integer NOT NULL,
    stock            integer NOT NULL,
    opens_at         bigint  NOT NULL,
    closes_at        bigint  NOT NULL,
    valid_for        bigint  NOT NULL
);
-- One row per issued coupon: the primary key is "never one user twice", the unique code "a code
-- names one holder".
CREATE TABLE coupon_holders (
    coupon_id  text    NOT NULL,
    user_id    text    NOT NULL,
    partition  integer NOT NULL,
    claim_id   text    NOT NULL,
    code       text    NOT NULL,
    expires_at bigint  NOT NULL,
    PRIMARY KEY (coupon_id, user_id),
    UNIQUE (coupon_id, code)
);
CREATE INDEX coupon_holders_partition ON coupon_holders (partition);
-- Rejected claims, so a retried claim id gets the decision it got before.
CREATE TABLE coupon_rejections (
    coupon_id text    NOT NULL,
    user_id   text    NOT NULL,
    claim_id  text    NOT NULL,
    partition integer NOT NULL,
    reason    text    NOT NULL,
    PRIMARY KEY (coupon_id, user_id, claim_id)
);
CREATE INDEX coupon_rejections_partition ON coupon_rejections (partition);
-- The primary key is "a code is redeemed at most once".
CREATE TABLE coupon_redemptions (
    coupon_id text    NOT NULL,
    code      text    NOT NULL,
    partition integer NOT NULL,
    order_id  text    NOT NULL,
    PRIMARY KEY (coupon_id, code)
);
CREATE INDEX coupon_redemptions_partition ON coupon_redemptions (partition);
