-- Both backends: user $1's locale, if they saved preferences.
SELECT locale FROM user_preferences WHERE user_id = $1
