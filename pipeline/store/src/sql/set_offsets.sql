-- Sets one partition's stored next offset, backward too (`tidings offsets reset`, run while the
-- stage is stopped; the stage's own writes go through upsert_offsets.sql, which only moves forward).
-- $1 consumer, $2 topic, $3 partition, $4 next offset.
INSERT INTO sink_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset
