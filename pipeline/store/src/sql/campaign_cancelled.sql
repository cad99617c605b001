-- Whether campaign $1 was cancelled: through the API or CLI (its definition) or by a
-- CampaignCancelled event templating consumed (its progress).
SELECT cancelled_at FROM campaigns WHERE campaign_id = $1 AND cancelled_at IS NOT NULL
UNION ALL
SELECT cancelled_at FROM campaign_progress WHERE campaign_id = $1 AND cancelled_at IS NOT NULL
