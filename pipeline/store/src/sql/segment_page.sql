-- Both backends: the first page of a segment's users, sorted. $1 segment, $2 limit. The primary key
-- (segment, user_id) serves it as one index range scan.
SELECT user_id FROM audience_segments WHERE segment = $1 ORDER BY user_id LIMIT $2
