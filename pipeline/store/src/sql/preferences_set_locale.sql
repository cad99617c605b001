-- Both backends: user $1's locale (null: each campaign's default), set with the other preferences.
UPDATE user_preferences SET locale = $2 WHERE user_id = $1
