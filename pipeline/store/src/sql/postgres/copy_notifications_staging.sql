COPY notifications_staging FROM STDIN (FORMAT binary)
