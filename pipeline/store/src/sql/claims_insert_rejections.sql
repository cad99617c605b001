-- Claims rejected in a batch.
INSERT INTO coupon_rejections (coupon_id, user_id, claim_id, partition, reason)
/* generated */
