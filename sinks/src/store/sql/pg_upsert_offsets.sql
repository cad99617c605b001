-- $2..$4 are parallel arrays with one entry per (topic, partition); offsets never move backward.
INSERT INTO sink_offsets (consumer, topic, partition, next_offset)
SELECT $1, t, p, o FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS u (t, p, o)
ON CONFLICT (consumer, topic, partition)
DO UPDATE SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset)
