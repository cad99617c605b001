SELECT coupon_id, user_id, claim_id, code, expires_at FROM coupon_holders WHERE partition = $1
