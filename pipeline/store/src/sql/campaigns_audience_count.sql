-- Both backends: a campaign's audience for category $1, each user once: the members of the named
-- segments' current versions and the inline ids (the code writes one bind per name and per id in
-- place of the markers), and how many of them opted out of the category.
WITH audience AS (
    SELECT m.user_id FROM segments s JOIN segment_members m ON m.version = s.version
    WHERE s.name IN (/* segments */)
    UNION
    SELECT column1 FROM (VALUES /* inline */) AS inline_ids WHERE column1 IS NOT NULL
)
SELECT count(*) AS audience,
       COALESCE(SUM(CASE WHEN EXISTS (
           SELECT 1 FROM user_opt_outs o WHERE o.category = $1 AND o.user_id = a.user_id
       ) THEN 1 ELSE 0 END), 0) AS opted_out
FROM audience a
