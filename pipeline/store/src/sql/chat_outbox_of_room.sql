-- A room's waiting events in the order they were written. $1 room, $2 limit.
SELECT id, room_id, event FROM chat_outbox WHERE room_id = $1 ORDER BY id LIMIT $2
