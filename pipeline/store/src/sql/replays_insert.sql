-- A replay or dead-letter re-drive is started: its plan and filters, resolved once, are stored
-- with it, so a resume reads the same ranges.
INSERT INTO replays
    (replay_id, kind, fingerprint, started_by, started_at, updated_at, finished_at, outcome, topic, stage,
     plan, filters, progress, counts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
