-- A batch of replay $1 is committed: where each partition got to and the counts so far. A resumed
-- replay is running again (finished_at cleared).
UPDATE replays
SET progress = $2, counts = $3, updated_at = $4, outcome = 'running', finished_at = NULL
WHERE replay_id = $1
