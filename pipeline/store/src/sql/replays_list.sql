-- Replays of kind $1, the newest first, at most $2.
SELECT replay_id, kind, fingerprint, started_by, started_at, updated_at, finished_at, outcome, topic, stage,
       plan, filters, progress, counts
FROM replays
WHERE kind = $1
ORDER BY started_at DESC, replay_id DESC
LIMIT $2
