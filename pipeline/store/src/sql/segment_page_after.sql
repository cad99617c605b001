-- Both backends: a later page of a segment's users, sorted, strictly after $2 (the last user of the
-- previous page). $3 limit. The primary key (segment, user_id) serves it as one index range scan.
SELECT user_id FROM audience_segments WHERE segment = $1 AND user_id > $2 ORDER BY user_id LIMIT $3
