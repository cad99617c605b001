-- Coupons issued in a batch, streamed as binary COPY; a user already holding the coupon violates
-- the primary key and fails the batch, as the INSERT does (the decisions never issue twice).
COPY coupon_holders (coupon_id, user_id, partition, claim_id, code, expires_at) FROM STDIN (FORMAT binary)
