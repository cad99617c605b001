-- Coupons issued in a batch; a user already holding the coupon violates the primary key and fails
-- the batch (the decisions never issue twice; the table makes sure).
INSERT INTO coupon_holders (coupon_id, user_id, partition, claim_id, code, expires_at)
/* generated */
