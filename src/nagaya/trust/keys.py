"""Key pairs as cosign writes them, so that cosign, skopeo and podman read nagaya's keys and nagaya reads theirs.

The private key is ECDSA P-256 in PKCS#8, encrypted at rest exactly as sigstore's go code does
(go-securesystemslib `encrypted`): scrypt (N=32768, r=8, p=1, a 32-byte salt) derives a key for NaCl's
secretbox (XSalsa20-Poly1305, 24-byte nonce); the JSON {kdf, cipher, ciphertext} is the body of an
"ENCRYPTED SIGSTORE PRIVATE KEY" PEM block. Those scrypt parameters are the ones every sigstore version
accepts. The public key is a plain "PUBLIC KEY" (SubjectPublicKeyInfo) PEM block.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nagaya.errors import NagayaError, UsageError

PEM_TYPES = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")   # new, legacy cosign
SCRYPT = {"N": 32768, "r": 8, "p": 1}
MAX_KEY_FILE = 64 << 10


class TrustError(NagayaError):
    """A key, signature or policy problem: one line for the user."""

    exit_code = 2


def _pem(kind: str, body: bytes) -> bytes:
    b64 = base64.b64encode(body).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


def _unpem(data: bytes, where: str) -> tuple[str, bytes]:
    text = data.decode("ascii", "replace")
    start = text.find("-----BEGIN ")
    end_label = text.find("-----", start + 11) if start >= 0 else -1
    if start < 0 or end_label < 0:
        raise TrustError(f"{where}: not a PEM file")
    kind = text[start + 11:end_label]
    footer = f"-----END {kind}-----"
    stop = text.find(footer, end_label)
    if stop < 0:
        raise TrustError(f"{where}: truncated PEM block")
    try:
        return kind, base64.b64decode("".join(text[end_label + 5:stop].split()), validate=True)
    except ValueError:
        raise TrustError(f"{where}: corrupt PEM block") from None


def _kdf(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    n, r, p = int(params["N"]), int(params["r"]), int(params["p"])
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * r * n + (1 << 20))


def encrypt_private(der: bytes, passphrase: bytes) -> bytes:
    from nacl.secret import SecretBox

    salt, nonce = os.urandom(32), os.urandom(24)
    box = SecretBox(_kdf(passphrase, salt, SCRYPT))
    ct = box.encrypt(der, nonce).ciphertext          # Poly1305 tag + ciphertext, as Go's secretbox.Seal
    doc = {"kdf": {"name": "scrypt", "params": SCRYPT, "salt": base64.b64encode(salt).decode()},
           "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
           "ciphertext": base64.b64encode(ct).decode()}
    return _pem(PEM_TYPES[0], json.dumps(doc).encode())


# go-securesystemslib accepts exactly these scrypt parameter sets (Legacy, Standard, OWASP); so do we
KNOWN_SCRYPT = ((32768, 8, 1), (65536, 8, 1), (131072, 8, 1))


def open_sealed(doc_bytes: bytes, passphrase: bytes, where: str) -> bytes:
    """go-securesystemslib's `encrypted.Decrypt`: the JSON {kdf, cipher, ciphertext} -> plaintext."""
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox

    try:
        doc = json.loads(doc_bytes)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf["name"] != "scrypt" or cipher["name"] != "nacl/secretbox":
            raise TrustError(f"{where}: unsupported key encryption {kdf['name']}/{cipher['name']}")
        params = {k: int(kdf["params"][k]) for k in ("N", "r", "p")}
        salt, nonce = base64.b64decode(kdf["salt"]), base64.b64decode(cipher["nonce"])
        ct = base64.b64decode(doc["ciphertext"])
    except (ValueError, KeyError, TypeError):
        raise TrustError(f"{where}: malformed encrypted private key") from None
    if (params["N"], params["r"], params["p"]) not in KNOWN_SCRYPT:
        raise TrustError(f"{where}: unsupported scrypt parameters {params}")
    try:
        return SecretBox(_kdf(passphrase, salt, params)).decrypt(ct, nonce)
    except CryptoError:
        raise TrustError(f"{where}: wrong passphrase (or a corrupt key)") from None


def decrypt_private(pem: bytes, passphrase: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    kind, body = _unpem(pem, where)
    if kind not in PEM_TYPES:
        raise TrustError(f"{where}: not an encrypted cosign/sigstore private key (PEM type {kind!r})")
    try:
        key = serialization.load_der_private_key(open_sealed(body, passphrase, where), None)
    except ValueError:
        raise TrustError(f"{where}: the decrypted key is not PKCS#8") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError(f"{where}: only ECDSA keys are supported")
    return key


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(data: bytes, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise TrustError(f"{where}: not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TrustError(f"{where}: only ECDSA public keys are supported")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: names a key in messages and the verdict cache."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(key: ec.EllipticCurvePublicKey, data: bytes, sig: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


# -- the user's key store: $XDG_CONFIG_HOME/nagaya/keys, 0700; NAME.key 0600, NAME.pub 0644 ---------------------

def keys_dir() -> Path:
    from nagaya.config import _user_dirs

    return _user_dirs()[1] / "nagaya" / "keys"


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or name.startswith((".", "-")) or \
            not all(c.isalnum() or c in "._-" for c in name):
        raise UsageError(f"key name {name!r}: letters, digits and . _ - only")
    return name


def _private_store() -> Path:
    d = keys_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.chmod(d, 0o700)                  # created earlier with a laxer umask: tighten, never widen
    return d


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key (or follow a planted link); mode set at creation, so the encrypted
    # private key is never readable by others even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)                    # umask may have narrowed the public key's mode


def create(name: str, passphrase: bytes) -> tuple[Path, Path, str]:
    """A new key pair in the user's store: (private path, public path, fingerprint)."""
    _check_name(name)
    if not passphrase:
        raise UsageError("an empty passphrase would leave the private key unprotected; give one")
    d = _private_store()
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    if priv.exists() or pub.exists():
        raise UsageError(f"key {name!r} exists ({priv}); choose another name with -o")
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(priv, encrypt_private(der, passphrase), 0o600)
    _write_new(pub, public_pem(key.public_key()), 0o644)
    return priv, pub, fingerprint(key.public_key())


def find_private(name_or_path: str) -> Path:
    """A key by name in the user's store, or a path to a cosign.key."""
    p = Path(name_or_path)
    if "/" in name_or_path or name_or_path.endswith(".key"):
        return p
    return keys_dir() / f"{_check_name(name_or_path)}.key"


def find_public(name_or_path: str) -> Path:
    if "/" in name_or_path or name_or_path.endswith(".pub"):
        return Path(name_or_path)
    return keys_dir() / f"{_check_name(name_or_path)}.pub"


def read_file(path: Path, what: str) -> bytes:
    from nagaya import safefs

    try:
        return safefs.read_at(None, os.path.realpath(path), max_size=MAX_KEY_FILE)
    except FileNotFoundError:
        raise TrustError(f"{what} {path} not found (nagaya key ls)") from None
    except OSError as e:
        raise TrustError(f"{what} {path}: {e.strerror}") from None


def load_private(name_or_path: str, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    path = find_private(name_or_path)
    data = read_file(path, "private key")
    if os.stat(path).st_mode & 0o077 and path.parent == keys_dir():
        raise TrustError(f"{path} is readable by others; chmod 600 it first")
    return decrypt_private(data, passphrase, str(path))


def list_keys() -> list[dict[str, str]]:
    d = keys_dir()
    out = []
    for pub in sorted(d.glob("*.pub")) if d.is_dir() else []:
        try:
            fp = fingerprint(load_public(pub.read_bytes(), str(pub)))
        except (OSError, NagayaError):
            fp = "?"
        priv = pub.with_suffix(".key")
        out.append({"name": pub.stem, "fingerprint": fp, "public": str(pub),
                    "private": str(priv) if priv.exists() else ""})
    return out


def passphrase(passphrase_file: str | None, confirm: bool) -> bytes:
    """From --passphrase-file, else NAGAYA_KEY_PASSPHRASE, else a prompt on the terminal."""
    if passphrase_file:
        try:
            with open(passphrase_file, "rb") as f:
                return f.read(4096).rstrip(b"\r\n")
        except OSError as e:
            raise UsageError(f"--passphrase-file {passphrase_file}: {e.strerror}") from None
    env = os.environ.get("NAGAYA_KEY_PASSPHRASE")
    if env is not None:
        return env.encode()
    import getpass
    import sys

    if not sys.stdin.isatty():
        raise UsageError("no passphrase: give --passphrase-file FILE or set NAGAYA_KEY_PASSPHRASE")
    first = getpass.getpass("passphrase for the private key: ")
    if confirm and getpass.getpass("again: ") != first:
        raise UsageError("the passphrases differ")
    return first.encode()
