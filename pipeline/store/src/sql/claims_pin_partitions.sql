-- Records the input's partition count for a consumer group on its first start and returns the
-- recorded one (unchanged by later starts). $1 consumer, $2 partition count.
INSERT INTO claim_topics (consumer, partitions) VALUES ($1, $2)
ON CONFLICT (consumer) DO UPDATE SET partitions = claim_topics.partitions
RETURNING partitions
