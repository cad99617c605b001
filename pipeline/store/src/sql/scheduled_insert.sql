-- Both backends: a batch of records read from tidings.scheduled; the code writes one VALUES row per
-- record at the generated part. A record read again (a replay, a rebalance) keeps its first row,
-- released or not.
INSERT INTO scheduled_releases
    (release_id, source_partition, source_offset, release_at, release_to, record_key, record_value, headers, created_at)
/* generated */
ON CONFLICT (release_id) DO NOTHING
