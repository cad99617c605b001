SELECT r.room_id, r.kind, r.name, r.creator_id, r.product_id, r.closed, r.created_at,
       (SELECT count(*) FROM room_members c WHERE c.room_id = r.room_id) AS members
FROM chat_rooms r
WHERE r.room_id = $1
