-- A page of a room's history, newest first, below a seq (index chat_messages_room_seq).
SELECT message_id, room_id, source_offset AS seq, sender_id, text, occurred_at,
       edited_at IS NOT NULL AS edited, deleted
FROM chat_messages
WHERE room_id = $1 AND source_offset < $2
ORDER BY source_offset DESC
LIMIT $3
