-- The stored rejections of a batch's claims, given as three arrays ($1 coupon ids, $2 user ids,
-- $3 claim ids): the planner estimates an unnest at a few rows, so it probes the primary key once
-- per claim, whatever the table's size (the VALUES form got a hash join over the whole table once
-- the table outgrew its statistics, its time growing with every batch).
SELECT r.coupon_id, r.user_id, r.claim_id, r.reason
FROM unnest($1::text[], $2::text[], $3::text[]) AS k (coupon_id, user_id, claim_id)
JOIN coupon_rejections r ON r.coupon_id = k.coupon_id AND r.user_id = k.user_id AND r.claim_id = k.claim_id
