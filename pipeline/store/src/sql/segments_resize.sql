-- Both backends: segment $1's size moves by $2 members.
UPDATE segments SET size = size + $2 WHERE name = $1
