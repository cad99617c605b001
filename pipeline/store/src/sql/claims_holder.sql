-- The coupon issued to a user, if any, and whether its code was redeemed. $1 coupon id, $2 user id.
SELECT h.claim_id, h.code, h.expires_at,
       EXISTS (SELECT 1 FROM coupon_redemptions r WHERE r.coupon_id = h.coupon_id AND r.code = h.code) AS redeemed
FROM coupon_holders h
WHERE h.coupon_id = $1 AND h.user_id = $2
