-- The tags of a list of rooms; the code writes the rooms' binds ($1, $2, …) at the generated part,
-- as many as there are rooms.
SELECT room_id, tag FROM chat_room_tags WHERE room_id IN (/* generated */) ORDER BY tag
