INSERT OR IGNORE INTO chat_messages (
    message_id, room_id, sender_id, text, occurred_at, source_partition, source_offset
) 
