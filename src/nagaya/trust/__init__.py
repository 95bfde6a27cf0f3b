"""Image trust: cosign-compatible keys (keys.py), signatures in the registry (sign.py) and the site's
run-time policy (policy.py; its cached-verdict check is on `nagaya run`'s start-up path, so it is stdlib only)."""
