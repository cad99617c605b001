DELETE FROM chat_outbox WHERE id = $1
