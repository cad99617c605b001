-- Both backends: removes from version $1 the users loaded into version $2; one row per removed member.
DELETE FROM segment_members WHERE version = $1 AND user_id IN (SELECT user_id FROM segment_members WHERE version = $2)
