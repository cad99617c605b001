-- The newest replay of kind $1 run with the same command (fingerprint $2) that did not end done:
-- running (a crash), stopped or failed. The same command resumes it.
SELECT replay_id, kind, fingerprint, started_by, started_at, updated_at, finished_at, outcome, topic, stage,
       plan, filters, progress, counts
FROM replays
WHERE kind = $1 AND fingerprint = $2 AND outcome <> 'done'
ORDER BY started_at DESC, replay_id DESC
LIMIT 1
