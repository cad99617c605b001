-- An edit touches only the sender's own message and never revives a deleted one (an edit racing a
-- delete may arrive after it). $1 new text, $2 when, $3 message, $4 sender.
UPDATE chat_messages SET text = $1, edited_at = $2 WHERE message_id = $3 AND sender_id = $4 AND NOT deleted
