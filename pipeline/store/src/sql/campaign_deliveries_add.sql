INSERT INTO campaign_deliveries (campaign_id, instance, delivered, updated_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (campaign_id, instance) DO UPDATE SET
    delivered = campaign_deliveries.delivered + excluded.delivered,
    updated_at = excluded.updated_at
