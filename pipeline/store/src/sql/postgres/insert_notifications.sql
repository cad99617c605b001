INSERT INTO notifications (
    id, user_id, kind, title, body, link, source_event_id, occurred_at,
    source_topic, source_partition, source_offset, stream_partition, stream_offset, category
)
SELECT
    id, user_id, kind, title, body, link, source_event_id, occurred_at,
    source_topic, source_partition, source_offset, stream_partition, stream_offset, category
FROM notifications_staging
ON CONFLICT (id) DO NOTHING
