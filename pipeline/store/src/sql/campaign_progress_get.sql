-- A campaign's fan-out progress, as templating checkpointed it.
SELECT event_id, cursor, segment_versions, produced, held, suppressed, started_at, updated_at, finished_at, cancelled_at,
       failed_reason
FROM campaign_progress WHERE campaign_id = $1
