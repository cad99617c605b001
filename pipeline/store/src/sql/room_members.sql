SELECT user_id FROM room_members WHERE room_id = $1 ORDER BY user_id
