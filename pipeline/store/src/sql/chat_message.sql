SELECT message_id, room_id, source_offset AS seq, sender_id, text, occurred_at,
       edited_at IS NOT NULL AS edited, deleted
FROM chat_messages
WHERE message_id = $1
