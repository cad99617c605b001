SELECT coupon_id, title, discount_percent, stock, opens_at, closes_at, valid_for FROM coupon_definitions WHERE partition = $1
