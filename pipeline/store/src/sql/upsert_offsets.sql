-- Both backends: the offset upsert, one VALUES row per (topic, partition) pushed after this head,
-- then upsert_offsets_conflict.sql (offsets never move backward); one statement per batch.
INSERT INTO sink_offsets (consumer, topic, partition, next_offset) 
