-- Replay $1.
SELECT replay_id, kind, fingerprint, started_by, started_at, updated_at, finished_at, outcome, topic, stage,
       plan, filters, progress, counts
FROM replays
WHERE replay_id = $1
