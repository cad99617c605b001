-- Marks the rows whose ids are bound in place of the generated part released at $1.
UPDATE scheduled_releases SET released_at = $1 WHERE released_at IS NULL AND release_id IN (/* generated */)
