-- The preferences of one page of recipients in one statement: who opted out of category $1, and
-- the locale, time zone and quiet hours of those who saved preferences (a user without a row has
-- the defaults). The code writes one bind per user id at each generated part, the same binds in
-- both, so each part is one index range per page.
SELECT user_id, 1 AS opted_out, NULL AS locale, NULL AS time_zone, NULL AS quiet_start, NULL AS quiet_end
FROM user_opt_outs WHERE category = $1 AND user_id IN (/* generated */)
UNION ALL
SELECT user_id, 0, locale, time_zone, quiet_start, quiet_end
FROM user_preferences WHERE user_id IN (/* generated */)
