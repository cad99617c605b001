-- The partition count of `coupon-claims` the claim stage's state was decided under, per consumer
-- group: the stage's state is kept by partition, and another count would move a coupon's records
-- to a partition whose owner does not hold its state, so the stage refuses to run under another.
CREATE TABLE claim_topics (
    consumer   text    PRIMARY KEY,
    partitions integer NOT NULL
);
