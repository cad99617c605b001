SELECT coupon_id, code, order_id FROM coupon_redemptions WHERE partition = $1
