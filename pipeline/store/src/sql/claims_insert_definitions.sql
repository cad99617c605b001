-- New coupon definitions of a batch; the code writes one VALUES row per definition.
INSERT INTO coupon_definitions (coupon_id, partition, title, discount_percent, stock, opens_at, closes_at, valid_for)
/* generated */
