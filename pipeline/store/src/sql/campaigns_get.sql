-- Both backends: campaign $1 with its fan-out progress, stored count (the partial index on
-- notifications' campaign rows) and delivered count (the sum over gateways).
SELECT c.campaign_id, c.event_id, c.category, c.definition, c.send_at, c.created_at, c.launched_by,
       c.audience_estimate, c.cancelled_at,
       p.started_at, p.produced, p.held, p.suppressed, p.finished_at, p.cancelled_at AS progress_cancelled_at,
       p.failed_reason,
       (SELECT count(*) FROM notifications n
         WHERE n.kind = 'campaign' AND n.source_event_id = c.event_id) AS stored,
       (SELECT CAST(COALESCE(SUM(d.delivered), 0) AS bigint) FROM campaign_deliveries d
         WHERE d.campaign_id = c.campaign_id) AS delivered
FROM campaigns c LEFT JOIN campaign_progress p ON p.campaign_id = c.campaign_id
WHERE c.campaign_id = $1
