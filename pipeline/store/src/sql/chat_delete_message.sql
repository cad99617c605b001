-- A delete touches only the sender's own message and keeps its row, emptied. $1 when, $2 message, $3 sender.
UPDATE chat_messages SET text = '', deleted = true, edited_at = $1 WHERE message_id = $2 AND sender_id = $3
