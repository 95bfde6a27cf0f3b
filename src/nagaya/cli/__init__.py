"""Command-line front end: thin modules that parse, call a part, and print."""
