-- No row when the user is a member already. $1 room, $2 user, $3 joined at.
INSERT INTO room_members (room_id, user_id, joined_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING
