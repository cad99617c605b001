-- Both backends: users of segment version $1 after $2 (empty: from the start), sorted, at most $3.
-- The primary key (version, user_id) serves it as one index range scan.
SELECT user_id FROM segment_members WHERE version = $1 AND user_id > $2 ORDER BY user_id LIMIT $3
