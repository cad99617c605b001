-- Which of a page of recipients opted out of category $1: one index range per statement; the code
-- writes one bind per user id in place of the generated part.
SELECT user_id FROM user_opt_outs WHERE category = $1 AND user_id IN (/* generated */)
