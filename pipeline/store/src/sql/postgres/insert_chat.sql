INSERT INTO chat_messages (
    message_id, room_id, sender_id, text, occurred_at, source_partition, source_offset
)
SELECT message_id, room_id, sender_id, text, occurred_at, source_partition, source_offset
FROM chat_staging
ON CONFLICT (message_id) DO NOTHING
