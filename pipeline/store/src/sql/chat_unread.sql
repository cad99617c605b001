-- A member's read position in a room and how many of the others' messages after it are not deleted.
SELECT m.read_seq,
       (SELECT count(*) FROM chat_messages x
         WHERE x.room_id = m.room_id AND x.source_offset > m.read_seq
           AND x.sender_id <> m.user_id AND NOT x.deleted) AS unread
FROM room_members m
WHERE m.room_id = $1 AND m.user_id = $2
