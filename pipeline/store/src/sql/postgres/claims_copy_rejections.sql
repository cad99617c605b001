-- Claims rejected in a batch, streamed as binary COPY (a batch's rows are most of its write).
COPY coupon_rejections (coupon_id, user_id, claim_id, partition, reason) FROM STDIN (FORMAT binary)
