-- Head of a multi-row insert: sqlite.rs appends the VALUES rows, a chunk per statement; rows already
-- stored (same id) are skipped.
INSERT OR IGNORE INTO notifications (
    id, user_id, kind, title, body, link, source_event_id, occurred_at,
    source_topic, source_partition, source_offset, stream_partition, stream_offset, category
) 
