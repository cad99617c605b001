-- Both backends: the quiet hours of a campaign's audience (as campaigns_audience_count.sql) who did
-- not opt out of category $1, one row per distinct window with its user count; the caller decides
-- which windows hold "now" in their time zone.
WITH audience AS (
    SELECT m.user_id FROM segments s JOIN segment_members m ON m.version = s.version
    WHERE s.name IN (/* segments */)
    UNION
    SELECT column1 FROM (VALUES /* inline */) AS inline_ids WHERE column1 IS NOT NULL
)
SELECT p.time_zone, p.quiet_start, p.quiet_end, count(*) AS users
FROM audience a JOIN user_preferences p ON p.user_id = a.user_id
WHERE p.quiet_start IS NOT NULL AND p.quiet_end IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM user_opt_outs o WHERE o.category = $1 AND o.user_id = a.user_id)
GROUP BY p.time_zone, p.quiet_start, p.quiet_end
