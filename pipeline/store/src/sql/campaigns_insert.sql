-- Both backends: a campaign's definition; an existing id is left as it is (the caller compares).
INSERT INTO campaigns (campaign_id, event_id, category, definition, send_at, created_at, launched_by, audience_estimate)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (campaign_id) DO NOTHING
