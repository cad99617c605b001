-- Both backends: the stored offsets of one batch in one statement; the code writes one VALUES row per
-- (topic, partition) at the generated part. Offsets never move backward.
INSERT INTO sink_offsets (consumer, topic, partition, next_offset)
/* generated */
ON CONFLICT (consumer, topic, partition)
DO UPDATE SET next_offset = excluded.next_offset WHERE excluded.next_offset > sink_offsets.next_offset
