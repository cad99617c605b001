SELECT coupon_id, user_id, claim_id, reason FROM coupon_rejections WHERE partition = $1
