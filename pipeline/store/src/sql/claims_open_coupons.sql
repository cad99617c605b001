-- Coupons whose claim window has not closed at $1 (microseconds), newest opening first, with how
-- many were issued. $2 limit.
SELECT d.coupon_id, d.title, d.discount_percent, d.stock, d.opens_at, d.closes_at, d.valid_for,
       (SELECT count(*) FROM coupon_holders h WHERE h.coupon_id = d.coupon_id) AS holders
FROM coupon_definitions d
WHERE d.closes_at > $1
ORDER BY d.opens_at DESC, d.coupon_id
LIMIT $2
