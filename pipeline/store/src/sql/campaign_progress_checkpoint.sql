-- A page of a campaign's fan-out is acknowledged: its cursor and counters move, `started_at`
-- stays the first page's, and a finish or cancel already recorded is kept, and so is its failure
-- (a failure is only recorded with the finish it comes with).
INSERT INTO campaign_progress
    (campaign_id, event_id, cursor, segment_versions, produced, held, suppressed, started_at, updated_at, finished_at,
     failed_reason)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (campaign_id) DO UPDATE SET
    cursor = excluded.cursor,
    segment_versions = excluded.segment_versions,
    produced = excluded.produced,
    held = excluded.held,
    suppressed = excluded.suppressed,
    updated_at = excluded.updated_at,
    failed_reason = CASE WHEN campaign_progress.finished_at IS NULL THEN excluded.failed_reason
                         ELSE campaign_progress.failed_reason END,
    finished_at = COALESCE(campaign_progress.finished_at, excluded.finished_at)
