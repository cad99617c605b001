-- The stored rejections of a batch's claims (coupon, user, claim id), so a retried claim is
-- answered as before without the stage keeping every rejection in memory.
SELECT coupon_id, user_id, claim_id, reason FROM coupon_rejections
WHERE (coupon_id, user_id, claim_id) IN (/* generated */)
