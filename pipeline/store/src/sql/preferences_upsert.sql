INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end, updated_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (user_id) DO UPDATE SET
    time_zone = excluded.time_zone,
    quiet_start = excluded.quiet_start,
    quiet_end = excluded.quiet_end,
    updated_at = excluded.updated_at
