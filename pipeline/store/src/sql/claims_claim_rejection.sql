-- The rejection of one claim, if it was rejected. $1 coupon id, $2 user id, $3 claim id.
SELECT claim_id, reason FROM coupon_rejections WHERE coupon_id = $1 AND user_id = $2 AND claim_id = $3
