-- Both backends: a user's notifications on stream partition $2 after offset $3, oldest first, so an
-- SSE client can resume from its last event. $4 limit.
SELECT id, user_id, kind, title, body, link, source_event_id, occurred_at, source_topic,
       source_partition, source_offset, stream_partition, stream_offset, read_at IS NOT NULL AS read
FROM notifications
WHERE user_id = $1 AND stream_partition = $2 AND stream_offset > $3
ORDER BY stream_offset
LIMIT $4
