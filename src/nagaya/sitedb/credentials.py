"""Token secrets: 32 random bytes, shown once, stored as sha256. A prefix tells the kinds apart."""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets

ROBOT_PREFIX = "nyr_"       # robot tokens
USER_PREFIX = "nyp_"        # personal access tokens


def new_secret(prefix: str) -> str:
    return prefix + _secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # A fast hash is right here: the secret has 256 bits of entropy, nothing to stretch.
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
