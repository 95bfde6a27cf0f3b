"""Client side of the site: the credentials file (`authfile`) and the server's JSON API (`api`)."""
