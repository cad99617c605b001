-- Offsets never move backward.
INSERT INTO sink_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer, topic, partition)
DO UPDATE SET next_offset = MAX(sink_offsets.next_offset, excluded.next_offset)
