SELECT time_zone, quiet_start, quiet_end FROM user_preferences WHERE user_id = $1
