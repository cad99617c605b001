 ON CONFLICT (consumer, topic, partition)
DO UPDATE SET next_offset = excluded.next_offset WHERE excluded.next_offset > sink_offsets.next_offset
