-- Both backends: the first page of a segment's current users, sorted. $1 segment, $2 limit. The
-- primary key (version, user_id) serves it as one index range scan.
SELECT m.user_id FROM segments s JOIN segment_members m ON m.version = s.version
WHERE s.name = $1 ORDER BY m.user_id LIMIT $2
