"""`nagaya key create|ls|export`, `nagaya sign` and `nagaya verify`: cosign-compatible keys and signatures."""

from __future__ import annotations

import sys
from typing import Any

import typer

from nagaya import config
from nagaya.cli.common import console, print_json

app = typer.Typer(help="Signing keys (cosign-compatible; the private key encrypted at rest).", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="machine-readable output")
PASSFILE = typer.Option(None, "--passphrase-file", help="read the passphrase from FILE (else NAGAYA_KEY_PASSPHRASE "
                                                          "or a prompt)")


@app.command("create")
def key_create(project: str = typer.Option(None, "--project", help="a key for this project (named after it)"),
               name: str = typer.Option(None, "-o", "--output", help="key name (default: 'default' or the project)"),
               passphrase_file: str = PASSFILE, json_out: bool = JSON) -> None:
    """Make an ECDSA P-256 key pair: NAME.key (encrypted, 0600) and NAME.pub in ~/.config/nagaya/keys."""
    from nagaya.trust import keys

    priv, pub, fp = keys.create(name or project or "default", keys.passphrase(passphrase_file, confirm=True))
    if json_out:
        print_json({"private": str(priv), "public": str(pub), "fingerprint": fp})
        return
    console.print(f"private key {priv} (encrypted)\npublic key  {pub}\nfingerprint {fp}", highlight=False)
    if project:
        console.print(f"give {pub.name} to your site admin for the {project} project's signing policy",
                      highlight=False)


@app.command("ls")
def key_ls(json_out: bool = JSON) -> None:
    """List your key pairs and their fingerprints."""
    from nagaya.trust import keys

    rows = keys.list_keys()
    if json_out:
        print_json(rows)
        return
    for r in rows:
        console.print(f"{r['name']:<20} {r['fingerprint']}{'' if r['private'] else '  (public only)'}",
                      highlight=False)


@app.command("export")
def key_export(name: str = typer.Argument("default", help="key name or .pub path")) -> None:
    """Print a public key (PEM), for cosign, skopeo's policy.json or the site's policy."""
    from nagaya.trust import keys

    path = keys.find_public(name)
    data = keys.read_file(path, "public key")
    keys.load_public(data, str(path))
    sys.stdout.write(data.decode())


def _ref(text: str):  # -> Reference
    from nagaya.image.pull import parse_remote

    return parse_remote(text)


def sign(ref: str = typer.Argument(..., help="HOST[:PORT]/PROJECT/NAME[:TAG|@DIGEST]"),
         key: str = typer.Option("default", "--key", "-k", help="key name or path to a cosign .key"),
         passphrase_file: str = PASSFILE, json_out: bool = JSON) -> None:
    """Sign an image in a registry (a cosign signature, stored beside it as sha256-HEX.sig)."""
    out = sign_ref(ref, key, passphrase_file)
    if json_out:
        print_json(out)
        return
    console.print(f"signed {out['ref']} ({out['digest']}) with {out['key']}", highlight=False)


def sign_ref(text: str, key: str, passphrase_file: str | None) -> dict[str, str]:
    from nagaya.trust import keys

    _ref(text)                              # a bad reference fails before the passphrase is asked for
    return sign_with(text, keys.load_private(key, keys.passphrase(passphrase_file, confirm=False)), key)


def sign_with(text: str, private: Any, key: str) -> dict[str, str]:
    """Sign the image `text` names with an unlocked key (`nagaya sign`, `nagaya build --push --sign`)."""
    from nagaya.trust import keys
    from nagaya.trust import sign as signing

    ref = _ref(text)
    cfg = config.load()
    with signing.open_for(ref, cfg, push=True) as reg:
        digest, tag = signing.sign(reg, ref, private)
    return {"ref": str(ref), "digest": digest, "signature": f"{ref.name}:{tag}", "key": key,
            "fingerprint": keys.fingerprint(private.public_key())}


def verify(ref: str = typer.Argument(..., help="HOST[:PORT]/PROJECT/NAME[:TAG|@DIGEST]"),
           key: list[str] = typer.Option(None, "--key", "-k",
                                         help="public key name or .pub path (repeatable; default: all of yours)"),
           json_out: bool = JSON) -> None:
    """Check an image's signature: this digest, this repository, made by one of the keys."""
    from nagaya.trust import sign as signing

    r = _ref(ref)
    trusted = signing.load_trusted(list(key or []) or signing.default_public_keys())
    with signing.open_for(r, config.load(), push=False) as reg:
        v = signing.verify(reg, r.name, signing.resolve(reg, r), trusted)
    if json_out:
        print_json({"ref": ref, "digest": v.digest, "identity": v.identity, "key": v.key_name,
                    "fingerprint": v.key})
        return
    console.print(f"verified {ref} ({v.digest}): signed by {v.key_name} ({v.key[:19]}) for {v.identity}",
                  highlight=False)
