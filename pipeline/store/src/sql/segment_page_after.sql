-- Both backends: a later page of a segment's current users, sorted, strictly after $2 (the last
-- user of the previous page). $3 limit. The primary key (version, user_id) serves it as one index
-- range scan. A reader that must not see a replace midway pages a pinned version instead
-- (`segments_version_page.sql`).
SELECT m.user_id FROM segments s JOIN segment_members m ON m.version = s.version
WHERE s.name = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3
