-- Redemptions accepted in a batch; a second one of a code violates the primary key.
INSERT INTO coupon_redemptions (coupon_id, code, partition, order_id)
/* generated */
