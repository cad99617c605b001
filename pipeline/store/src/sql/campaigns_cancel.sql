-- Both backends: marks campaign $1 cancelled at $2 (a second cancel keeps the first time).
UPDATE campaigns SET cancelled_at = $2 WHERE campaign_id = $1 AND cancelled_at IS NULL
