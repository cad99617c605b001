SELECT CAST(COALESCE(SUM(delivered), 0) AS bigint) FROM campaign_deliveries WHERE campaign_id = $1
