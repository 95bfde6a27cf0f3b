"""Registry bearer tokens (the distribution token spec): ES256 JWTs with an `x5c` chain."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class Scope:
    type: str          # repository | registry
    name: str          # project/name, or "catalog"
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """`repository:proj/name:pull,push`; the type may carry a class (`repository(plugin)`)."""
        try:
            typ, rest = text.split(":", 1)
            name, actions = rest.rsplit(":", 1)
        except ValueError:
            return None
        typ = typ.split("(", 1)[0]
        if not typ or not name:
            return None
        return cls(typ, name, tuple(a for a in actions.split(",") if a))


class TokenIssuer:
    def __init__(self, key_pem: Path, cert_pem: Path, ca_pem: Path, issuer: str, service: str, ttl: int) -> None:
        self.key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
        chain = [x509.load_pem_x509_certificate(p.read_bytes()) for p in (cert_pem, ca_pem)]
        self.x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
        self.issuer, self.service, self.ttl = issuer, service, ttl

    def issue(self, subject: str, access: list[dict[str, Any]]) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "iat": now, "nbf": now - 5,
                  "exp": now + self.ttl, "jti": secrets.token_hex(16), "access": access}
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": self.x5c})  # type: ignore[arg-type]
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        # docker reads `token`, OAuth2 clients `access_token`: send both, as the spec says.
        return {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}
