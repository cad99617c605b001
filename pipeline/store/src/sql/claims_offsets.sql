-- The claim stage's next offset per partition, as committed with its state (read only: no epoch bump).
-- $1 consumer.
SELECT partition, next_offset FROM claim_partitions WHERE consumer = $1 AND next_offset IS NOT NULL
