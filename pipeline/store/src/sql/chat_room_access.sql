-- What a send needs, in one query on every send: whether room $1 is closed, whether $2 is a member,
-- the member count, and where message $3 (if any) is stored in that room (a retried send).
SELECT r.closed,
       (SELECT count(*) FROM room_members m WHERE m.room_id = r.room_id AND m.user_id = $2) AS member,
       (SELECT count(*) FROM room_members m WHERE m.room_id = r.room_id) AS members,
       c.source_partition, c.source_offset
FROM chat_rooms r
LEFT JOIN chat_messages c ON c.message_id = $3 AND c.room_id = r.room_id
WHERE r.room_id = $1
