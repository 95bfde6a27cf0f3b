"""Key and signature formats against vectors made by the Go implementations (independent of nagaya's code):
go-securesystemslib's `encrypted` (what cosign and containers/image encrypt private keys with) and a
signature made by cosign (containers/image's signature/fixtures/dir-img-cosign-valid, cosign.pub)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from nagaya.trust import keys, sign
from nagaya.trust.keys import TrustError

# go-securesystemslib encrypted/encrypted_test.go, passphrase "supersecret": TestDecrypt's vector seals
# "reallyimportant"; kdfVectors[Standard] seals it JSON-marshalled (a base64 string: the Unmarshal API)
GO_SEALED = [
    b'{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"N9a7x5JFGbrtB2uBR81jPwp0eiLR4A7FV3mjVAQrg1g="},'
    b'"cipher":{"name":"nacl/secretbox","nonce":"2h8HxMmgRfuYdpswZBQaU3xJ1nkA/5Ik"},'
    b'"ciphertext":"SEW6sUh0jf2wfdjJGPNS9+bkk2uB+Cxamf32zR8XkQ=="}',
    b'{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"FhzPOt9/bJG4PTq6lQ6ecG6GzaOuOy/ynG5+yRiFlNs="},'
    b'"cipher":{"name":"nacl/secretbox","nonce":"aw1ng1jHaDz/tQ7V2gR9O2+IGQ8xJEuE"},'
    b'"ciphertext":"HycvuLZL4sYH0BrYTh4E/H20VtAW6u5zL5Pr+IBjYLYnCPzDkq8="}',
]
GO_BAD_PARAMS = (b'{"kdf":{"name":"scrypt","params":{"N":99,"r":99,"p":99},'
                 b'"salt":"cZFcQJdwPhPyhU1R4qkl0qVOIjZd4V/7LYYAavq166k="},"cipher":{"name":"nacl/secretbox","nonce":"7vhRS7j0hEPBWV05skAdgLj81AkGeE7U"},'
                 b'"ciphertext":"6WYU/YSXVbYzl/NzaeAzmjLyfFhOOjLc0d8/GFV0aBFdJvyCcXc="}')

# cosign-made: containers/image signature/fixtures (cosign.pub; dir-img-cosign-valid/{manifest.json,signature-1})
COSIGN_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFNLqFhf4fiN6o/glAuYnq2jYUeL0
vRuLu/z39pmbVwS9ff5AYnlwaP9sxREajdLY9ynM6G1sy6AAmb7Z63TsLg==
-----END PUBLIC KEY-----
"""
COSIGN_PAYLOAD = (
    "eyJjcml0aWNhbCI6eyJpZGVudGl0eSI6eyJkb2NrZXItcmVmZXJlbmNlIjoiMTkyLjE2OC42NC4yOjUwMDAvY29zaWduLXNpZ25lZC1zaW5nbGUt"
    "c2FtcGxlIn0sImltYWdlIjp7ImRvY2tlci1tYW5pZmVzdC1kaWdlc3QiOiJzaGEyNTY6NjM0YThmMzViNWYxNmRjZjRhYWEwODIyYWRjMGIxOTY0Y"
    "mI3ODZmY2ExMmY2ODMxZGU4ZGRjNDVlNTk4NmEwMCJ9LCJ0eXBlIjoiY29zaWduIGNvbnRhaW5lciBpbWFnZSBzaWduYXR1cmUifSwib3B0aW9uYW"
    "wiOm51bGx9")
COSIGN_SIG = "MEYCIQDmtamqYPjMg81nqeBhptrPls44aA/r7PwLmspINJY4MwIhANKRpqe2E9UCBtGFdPoz/8jAbaQm4uP4h+IpwKTE6ClR"
COSIGN_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"


@pytest.mark.parametrize(("sealed", "plain"), list(zip(GO_SEALED, [b"reallyimportant", b'"cmVhbGx5aW1wb3J0YW50"'],
                                                         strict=True)))
def test_go_sealed_vectors_open(sealed: bytes, plain: bytes) -> None:
    assert keys.open_sealed(sealed, b"supersecret", "v") == plain
    with pytest.raises(TrustError, match="wrong passphrase"):
        keys.open_sealed(sealed, b"wrong", "v")


def test_go_rejects_what_we_reject() -> None:
    with pytest.raises(TrustError, match="unsupported scrypt parameters"):
        keys.open_sealed(GO_BAD_PARAMS, b"supersecret", "v")


def test_cosign_signature_verifies() -> None:
    pub = keys.load_public(COSIGN_PUB, "cosign.pub")
    body = base64.b64decode(COSIGN_PAYLOAD)
    assert keys.verify(pub, body, base64.b64decode(COSIGN_SIG))
    crit = json.loads(body)["critical"]
    assert crit["type"] == sign.PAYLOAD_TYPE and crit["image"]["docker-manifest-digest"] == COSIGN_DIGEST
    assert not keys.verify(pub, body.replace(b"634a", b"634b"), base64.b64decode(COSIGN_SIG))


def test_create_sign_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    os.umask(0o022)
    priv, pub, fp = keys.create("k", b"pw")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and stat.S_IMODE(priv.parent.stat().st_mode) == 0o700
    pem = priv.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    _kind, body = keys._unpem(pem, "k")
    doc = json.loads(body)                 # the Go field names, base64 []byte values
    assert doc["kdf"]["params"] == {"N": 32768, "r": 8, "p": 1} and doc["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 32 and len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    key = keys.load_private("k", b"pw")
    with pytest.raises(TrustError, match="wrong passphrase"):
        keys.load_private("k", b"nope")
    payload = sign.payload("reg.example/p/img", COSIGN_DIGEST)
    public = keys.load_public(pub.read_bytes(), "pub")
    assert keys.verify(public, payload, keys.sign(key, payload)) and keys.fingerprint(public) == fp
    with pytest.raises(Exception, match="exists"):
        keys.create("k", b"pw")
    with pytest.raises(Exception, match="empty passphrase"):
        keys.create("k2", b"")
