COPY chat_staging FROM STDIN (FORMAT binary)
