-- Rooms with events written before $1, the room with the oldest event first. $2 limit.
SELECT room_id FROM chat_outbox WHERE created_at < $1 GROUP BY room_id ORDER BY min(id) LIMIT $2
