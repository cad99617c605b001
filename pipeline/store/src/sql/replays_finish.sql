-- Replay $1 ends with outcome $2 (done, stopped or failed), its last progress and counts.
UPDATE replays
SET outcome = $2, progress = $3, counts = $4, updated_at = $5, finished_at = $5
WHERE replay_id = $1
