-- Head of a multi-row insert: sqlite.rs appends the VALUES rows, a chunk per statement; rows already
-- stored (same id) are skipped.
INSERT OR IGNORE INTO chat_messages (
    message_id, room_id, sender_id, text, occurred_at, source_partition, source_offset
) 
