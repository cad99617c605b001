-- A user's rejected claims of a coupon carry no time, so the one answered is the most final:
-- closed, then sold out, not open, unknown coupon, already claimed. $1 coupon id, $2 user id.
SELECT claim_id, reason FROM coupon_rejections
WHERE coupon_id = $1 AND user_id = $2
ORDER BY CASE reason WHEN 'closed' THEN 0 WHEN 'sold_out' THEN 1 WHEN 'not_open' THEN 2
                     WHEN 'unknown_coupon' THEN 3 ELSE 4 END, claim_id
LIMIT 1
