INSERT INTO user_opt_outs (category, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING
