-- A member's rooms, the most recently active first, with unread counts and the last message.
SELECT t.*, lm.message_id AS last_id, lm.source_offset AS last_seq, lm.sender_id AS last_sender,
       lm.text AS last_text, lm.occurred_at AS last_at, lm.edited_at IS NOT NULL AS last_edited,
       lm.deleted AS last_deleted
FROM (
    SELECT r.room_id, r.kind, r.name, r.creator_id, r.product_id, r.closed, r.created_at,
           (SELECT count(*) FROM room_members c WHERE c.room_id = r.room_id) AS members,
           m.read_seq,
           (SELECT count(*) FROM chat_messages x
             WHERE x.room_id = r.room_id AND x.source_offset > m.read_seq
               AND x.sender_id <> m.user_id AND NOT x.deleted) AS unread,
           (SELECT max(x.source_offset) FROM chat_messages x WHERE x.room_id = r.room_id) AS top_seq
    FROM room_members m JOIN chat_rooms r ON r.room_id = m.room_id
    WHERE m.user_id = $1
) t
LEFT JOIN chat_messages lm ON lm.room_id = t.room_id AND lm.source_offset = t.top_seq
-- A page starts after the cursor ($2, $3, $4) of the previous one's last room; room id breaks ties.
WHERE (COALESCE(t.top_seq, -1), t.created_at, t.room_id) < ($2, $3, $4)
ORDER BY COALESCE(t.top_seq, -1) DESC, t.created_at DESC, t.room_id DESC
LIMIT $5
