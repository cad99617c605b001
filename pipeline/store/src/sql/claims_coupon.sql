-- A coupon's definition and how many were issued (stock left = stock - holders), for the coupon
-- API. $1 coupon id.
SELECT d.coupon_id, d.title, d.discount_percent, d.stock, d.opens_at, d.closes_at, d.valid_for,
       (SELECT count(*) FROM coupon_holders h WHERE h.coupon_id = d.coupon_id) AS holders
FROM coupon_definitions d
WHERE d.coupon_id = $1
