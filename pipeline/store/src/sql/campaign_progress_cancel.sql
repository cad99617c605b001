-- A CampaignCancelled event: the campaign is cancelled and finished at $3 (the first cancel and
-- finish recorded are kept); a campaign not started yet gets a progress row that says so.
INSERT INTO campaign_progress (campaign_id, event_id, started_at, updated_at, finished_at, cancelled_at)
VALUES ($1, $2, $3, $3, $3, $3)
ON CONFLICT (campaign_id) DO UPDATE SET
    cancelled_at = COALESCE(campaign_progress.cancelled_at, excluded.cancelled_at),
    finished_at = COALESCE(campaign_progress.finished_at, excluded.finished_at),
    updated_at = excluded.updated_at
