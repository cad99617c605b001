SELECT count(*) FROM notifications
