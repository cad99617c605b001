COPY users_staging FROM STDIN (FORMAT binary)
