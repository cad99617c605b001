-- The first page of open group rooms having every one of the tags asked for, by room id. $1 how many
-- tags, $2 limit; the code writes the tags' binds ($3, $4, …) at the generated part.
SELECT r.room_id, r.kind, r.name, r.creator_id, r.product_id, r.closed, r.created_at,
       (SELECT count(*) FROM room_members c WHERE c.room_id = r.room_id) AS members
FROM chat_rooms r
WHERE r.kind = 'group' AND NOT r.closed
  AND r.room_id IN (SELECT room_id FROM chat_room_tags WHERE tag IN (/* generated */)
                    GROUP BY room_id HAVING count(DISTINCT tag) = $1)
ORDER BY r.room_id
LIMIT $2
