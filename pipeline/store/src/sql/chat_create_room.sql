-- No row when a room with this id exists already: a direct room's id is derived from its product
-- and buyer, so creating it twice is not an error.
INSERT INTO chat_rooms (room_id, kind, name, creator_id, product_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (room_id) DO NOTHING
