-- Both backends: a later page of a user's inbox (archived ones left out), newest first, strictly
-- before the cursor ($2, $3) = (stream_partition, stream_offset) of the previous page's last item.
-- $4 limit.
SELECT id, user_id, kind, title, body, link, source_event_id, occurred_at, source_topic,
       source_partition, source_offset, stream_partition, stream_offset, read_at IS NOT NULL AS read
FROM notifications
WHERE user_id = $1 AND archived_at IS NULL AND (stream_partition, stream_offset) < ($2, $3)
ORDER BY stream_partition DESC, stream_offset DESC
LIMIT $4
