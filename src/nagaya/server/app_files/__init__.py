"""Files an interactive app runs inside the user's own image (never in the server): read as text and
written into the session's directory by the user's side of the dispatcher."""
