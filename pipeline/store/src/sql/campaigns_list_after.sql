-- Both backends: the campaigns created before campaign $2 (newest first), at most $1; the index
-- campaigns_created serves the row comparison.
SELECT c.campaign_id, c.event_id, c.category, c.definition, c.send_at, c.created_at, c.launched_by,
       c.audience_estimate, c.cancelled_at,
       p.started_at, p.produced, p.held, p.suppressed, p.finished_at, p.cancelled_at AS progress_cancelled_at,
       p.failed_reason,
       (SELECT count(*) FROM notifications n
         WHERE n.kind = 'campaign' AND n.source_event_id = c.event_id) AS stored,
       (SELECT CAST(COALESCE(SUM(d.delivered), 0) AS bigint) FROM campaign_deliveries d
         WHERE d.campaign_id = c.campaign_id) AS delivered
FROM campaigns c LEFT JOIN campaign_progress p ON p.campaign_id = c.campaign_id
WHERE (c.created_at, c.campaign_id) < (SELECT a.created_at, a.campaign_id FROM campaigns a WHERE a.campaign_id = $2)
ORDER BY c.created_at DESC, c.campaign_id DESC
LIMIT $1
