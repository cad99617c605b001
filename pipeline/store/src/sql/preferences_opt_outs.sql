SELECT category FROM user_opt_outs WHERE user_id = $1 ORDER BY category
