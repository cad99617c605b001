INSERT INTO chat_room_tags (tag, room_id) VALUES ($1, $2) ON CONFLICT DO NOTHING
