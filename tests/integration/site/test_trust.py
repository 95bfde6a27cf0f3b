"""Signed images against the real site registry, as unprivileged users: signed and verified in cosign's
stored form; tampered, wrong-key and missing signatures are refused in one line. (Interop with skopeo cannot
run on Debian 12, whose containers/image is built with sigstore disabled; tests/unit/test_trust_keys.py
checks the formats against vectors made by the Go implementations instead.) Then the site policy
(`[image] policy`): run and submit refuse an unsigned image under a rule that requires signatures, allow the
signed one, and match scopes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import Site, SiteUser, module_people, require

pytestmark = pytest.mark.integration
PASS = "correct horse battery"


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}\n{r.stdout[-1000:]}"
    return r


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """A refusal: non-zero, one line on stderr, naming what it says."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    require(shutil.which("skopeo") is not None, "skopeo is not installed")
    return module_people(site, "tr", ("alice", "bob"))


@pytest.fixture(scope="module")
def work(base_dir: Path, users: dict[str, SiteUser]) -> Path:
    d = base_dir / "trust"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    return d


def archive(work: Path, msg: str) -> Path:
    layers = [images.tar_bytes([images.entry("bin/", "dir"),
                                images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755)]),
              images.tar_bytes([images.entry("msg", "file", msg.encode())])]
    layout = images.oci_layout(work / f"{msg}.layout", layers, {"Cmd": ["/bin/busybox", "cat", "/msg"]})
    out = images.oci_archive(layout, work / f"{msg}.tar")
    subprocess.run(["chmod", "-R", "a+rX", str(layout), str(out)], check=True)
    return out


def env() -> dict[str, str]:
    return {"NAGAYA_KEY_PASSPHRASE": PASS}


def push(u: SiteUser, work: Path, ref: str) -> str:
    """Import a fresh image and push it with nagaya; its manifest digest."""
    local = f"local-{uuid.uuid4().hex[:8]}:1"
    ok(u.nagaya("image", "import", str(archive(work, uuid.uuid4().hex[:10])), "--name", local))
    return json.loads(ok(u.nagaya("push", local, ref, "--json")).stdout)["digest"]


@pytest.fixture(scope="module")
def keys(users: dict[str, SiteUser]) -> dict[str, Path]:
    alice = users["alice"]
    out = {}
    for name in ("main", "other"):
        r = ok(alice.nagaya("key", "create", "-o", name, "--json", env=env()))
        info = json.loads(r.stdout)
        priv = Path(info["private"])
        assert priv.stat().st_mode & 0o777 == 0o600 and priv.read_bytes().startswith(
            b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
        assert (priv.parent.stat().st_mode & 0o777) == 0o700
        out[name] = priv
        out[name + ".pub"] = Path(info["public"])
    ls = ok(alice.nagaya("key", "ls", "--json"))
    assert {k["name"] for k in json.loads(ls.stdout)} == {"main", "other"}
    exported = ok(alice.nagaya("key", "export", "main")).stdout
    assert exported == out["main.pub"].read_text()
    return out


def test_sign_and_verify(site: Site, users: dict[str, SiteUser], keys: dict[str, Path], work: Path) -> None:
    alice = users["alice"]
    ref = f"{site.registry}/{alice.name}/signed:1"
    digest = push(alice, work, ref)
    r = json.loads(ok(alice.nagaya("sign", ref, "--key", "main", "--json", env=env())).stdout)
    assert r["digest"] == digest and r["signature"].endswith(f":sha256-{digest[7:]}.sig")
    v = json.loads(ok(alice.nagaya("verify", ref, "--key", "main", "--json")).stdout)
    assert v["digest"] == digest and v["identity"] == f"{site.registry}/{alice.name}/signed"
    # by digest too, and a second signature (another key) is added beside the first
    ok(alice.nagaya("sign", f"{site.registry}/{alice.name}/signed@{digest}", "--key", "other", env=env()))
    for k in ("main", "other"):
        ok(alice.nagaya("verify", f"{site.registry}/{alice.name}/signed@{digest}", "--key", k))
    # the stored form is cosign's: an OCI manifest with one simple-signing layer per signature
    man = json.loads(ok(alice.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                   "--creds", ":".join(alice.creds(site.registry)),
                                   f"docker://{site.registry}/{alice.name}/signed:sha256-{digest[7:]}.sig"])).stdout)
    assert [x["mediaType"] for x in man["layers"]] == ["application/vnd.dev.cosign.simplesigning.v1+json"] * 2
    assert all("dev.cosignproject.cosign/signature" in x["annotations"] for x in man["layers"])


def test_refusals(site: Site, users: dict[str, SiteUser], keys: dict[str, Path], work: Path) -> None:
    from nagaya.image import oci
    from nagaya.image.registry import Registry
    from nagaya.trust import sign as signing

    alice = users["alice"]
    repo = f"{alice.name}/victim"
    ref, ref2 = f"{site.registry}/{repo}:1", f"{site.registry}/{repo}:2"
    d1, d2 = push(alice, work, ref), push(alice, work, ref2)
    # missing
    refused(alice.nagaya("verify", ref, "--key", "main"), "not signed", d1[:19])
    ok(alice.nagaya("sign", ref2, "--key", "main", env=env()))
    # wrong key
    refused(alice.nagaya("verify", ref2, "--key", "other"), "signature refused", "trusted keys")
    # the signature of :2 copied to :1's signature tag: the key verifies it, but for another digest
    with Registry(site.registry, repo, ("pull", "push"), insecure=[], auth_file=alice.auth_file) as reg:
        data, mt, _ = reg.get_manifest(signing.sig_tag(d2))
        reg.put_manifest(signing.sig_tag(d1), data, mt)
        refused(alice.nagaya("verify", ref, "--key", "main"), "another digest")
        # tampered: the payload now names :1's digest, the signature is still the one over :2's payload
        man = json.loads(data)
        layer = man["layers"][0]
        body = reg.get_blob_bytes(oci.Descriptor.parse(layer, "payload"), "payload").replace(
            d2.encode(), d1.encode())
        tmp = work / f"payload-{uuid.uuid4().hex[:6]}"
        tmp.write_bytes(body)
        layer.update(digest=oci.sha256_digest(body), size=len(body))
        reg.upload_blob(tmp, layer["digest"], len(body))
        reg.put_manifest(signing.sig_tag(d1), json.dumps(man).encode(), mt)
    refused(alice.nagaya("verify", ref, "--key", "main"), "do", "not verify", "tampered")


# ---- the site policy ------------------------------------------------------------------------------------------

def site_config(work: Path, name: str, rules: list[str]) -> Path:
    """A root-owned site config (in a root-owned directory) with these policy rules."""
    d = work / "etc"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    body = (f'[runtime]\nbackend = "bwrap"\nstaging_dir = "/var/lib/nagaya/mnt"\n\n[image]\n'
            f'keys_dir = "{d / "keys"}"\npolicy = [  # the longest matching scope decides\n'
            + "".join(f"  {r},\n" for r in rules) + "]\n")
    p = d / name
    p.write_text(body)
    p.chmod(0o644)
    return p


@pytest.fixture(scope="module")
def policy(site: Site, users: dict[str, SiteUser], keys: dict[str, Path], work: Path) -> dict[str, object]:
    """Alice's images: one signed by her key (installed by root as her project's key), one unsigned, one unsigned
    under a scope the policy leaves open; the site config requires signatures for her project."""
    alice = users["alice"]
    pdir = work / "etc" / "keys" / "projects" / alice.name
    pdir.mkdir(parents=True, exist_ok=True)
    for p in (work / "etc", work / "etc" / "keys", work / "etc" / "keys" / "projects", pdir):
        p.chmod(0o755)
    shutil.copy(keys["main.pub"], pdir / "alice.pub")
    (pdir / "alice.pub").chmod(0o644)
    base = f"{site.registry}/{alice.name}"
    refs = {k: f"{base}/{k}:1" for k in ("pol-signed", "pol-unsigned")} | {"open": f"{base}/open/x:1"}
    digests = {k: push(alice, work, r) for k, r in refs.items()}
    ok(alice.nagaya("sign", refs["pol-signed"], "--key", "main", env=env()))
    conf = site_config(work, "nagaya.toml", [
        '{ scope = "*", allow = "unsigned" }',
        f'{{ scope = "{base}", require = "signed", keys = ["{work}/etc/keys/none.pub", "project"] }}',
        f'{{ scope = "{base}/open", allow = "unsigned" }}'])
    return {"refs": refs, "digests": digests, "env": {"NAGAYA_SITE_CONFIG": str(conf)}, "base": base}


def test_policy_on_run(users: dict[str, SiteUser], policy: dict, work: Path) -> None:
    alice = users["alice"]
    refs, digests, penv = policy["refs"], policy["digests"], policy["env"]
    r = refused(alice.nagaya("run", refs["pol-unsigned"], "/bin/busybox", "true", env=penv),
                "refused by the site's image policy", "rule 2", "not signed")
    assert policy["base"] in r
    ok(alice.nagaya("run", refs["pol-signed"], "/bin/busybox", "true", env=penv))
    verdict = alice.u.home / ".cache" / "nagaya" / "trust" / digests["pol-signed"][7:]
    assert verdict.exists() and verdict.stat().st_mode & 0o077 == 0
    ok(alice.nagaya("run", refs["pol-signed"], "/bin/busybox", "true", env=penv))       # the cached verdict
    ok(alice.nagaya("run", refs["open"], "/bin/busybox", "true", env=penv))             # longest scope wins
    # by digest, as a job's node runs it, and a pulled image run from the cache by its digest alone
    refused(alice.nagaya("run", f"{refs['pol-unsigned'].rsplit(':', 1)[0]}@{digests['pol-unsigned']}",
                         "/bin/busybox", "true", env=penv), "rule 2")
    # (in a cache that got them by pulling: alice's own cache has them from her import, a local origin)
    fresh = {"XDG_CACHE_HOME": str(alice.u.mkdir(alice.u.home / f"cache-{uuid.uuid4().hex[:6]}"))}
    for k in ("pol-unsigned", "pol-signed"):
        ok(alice.nagaya("pull", refs[k], env=fresh))
    refused(alice.nagaya("run", digests["pol-unsigned"], "/bin/busybox", "true", env={**penv, **fresh}), "rule 2")
    ok(alice.nagaya("run", digests["pol-signed"], "/bin/busybox", "true", env={**penv, **fresh}))
    # without the policy the unsigned image runs
    ok(alice.nagaya("run", refs["pol-unsigned"], "/bin/busybox", "true"))
    # a site that requires signatures everywhere refuses a local-only image: it has nothing to verify
    strict = site_config(work, "strict.toml", [f'{{ scope = "*", require = "signed", keys = ["{work}/etc/k.pub"] }}'])
    local = f"loc-{uuid.uuid4().hex[:6]}:1"
    ok(alice.nagaya("image", "import", str(archive(work, "local-only")), "--name", local))
    refused(alice.nagaya("run", local, "/bin/busybox", "true", env={"NAGAYA_SITE_CONFIG": str(strict)}),
            "rule 1", "came from no registry")
    # a user's own config cannot loosen the site's policy
    cfg = alice.u.mkdir(alice.u.home / ".config" / "nagaya") / "nagaya.toml"
    cfg.write_text("[image]\npolicy = []\n")
    os.chown(cfg, alice.u.uid, alice.u.gid)
    try:
        refused(alice.nagaya("run", refs["pol-unsigned"], "/bin/busybox", "true",
                             env={**penv, "NAGAYA_IMAGE_POLICY": ""}), "rule 2")
    finally:
        cfg.unlink()


def test_policy_on_submit(users: dict[str, SiteUser], policy: dict) -> None:
    alice = users["alice"]
    refs, penv = policy["refs"], policy["env"]
    refused(alice.nagaya("submit", "--backend", "local", "--image", refs["pol-unsigned"], "--", "/bin/busybox",
                         "true", env=penv), "refused by the site's image policy", "rule 2")
    r = ok(alice.nagaya("submit", "--backend", "local", "--json", "--image", refs["pol-signed"], "--",
                        "/bin/busybox", "true", env=penv))
    assert json.loads(r.stdout)["digest"] == policy["digests"]["pol-signed"]


def test_policy_rejects_keys_not_roots(users: dict[str, SiteUser], policy: dict, work: Path) -> None:
    """A key file a user could have written is no site key."""
    alice = users["alice"]
    own = alice.u.home / "mine.pub"
    shutil.copy(policy_key(alice), own)
    os.chown(own, alice.u.uid, alice.u.gid)
    rule = f'{{ scope = "{policy["base"]}", require = "signed", keys = ["{own}"] }}'
    conf = site_config(work, "userkey.toml", [rule])
    refused(alice.nagaya("run", policy["refs"]["pol-signed"], "/bin/busybox", "true",
                         env={"NAGAYA_SITE_CONFIG": str(conf)}), "rule 1", "no usable trusted keys")


def policy_key(u: SiteUser) -> Path:
    return u.u.home / ".config" / "nagaya" / "keys" / "main.pub"


def test_build_push_sign(site: Site, users: dict[str, SiteUser], keys: dict[str, Path], work: Path) -> None:
    """`nagaya build --push --sign`: one step, and the pushed digest verifies."""
    require(shutil.which("buildah") is not None, "buildah is not installed")
    alice = users["alice"]
    subprocess.run(["usermod", "--add-subuids", "720000-785535", "--add-subgids", "720000-785535", alice.name],
                   check=True, capture_output=True)
    base = f"{site.registry}/{alice.name}/base:1"
    push(alice, work, base)
    c = alice.u.mkdir(alice.u.home / f"ctx-{uuid.uuid4().hex[:6]}")
    (c / "built.txt").write_text("built\n")
    (c / "Containerfile").write_text(f"FROM {base}\nCOPY built.txt /built\n")
    alice.u.chown_tree(c)
    target = f"{site.registry}/{alice.name}/built:1"
    fresh = {"XDG_CACHE_HOME": str(alice.u.mkdir(alice.u.home / f"cache-{uuid.uuid4().hex[:6]}"))}
    refused(alice.nagaya("build", "-t", target, "--sign", str(c), env=fresh), "--sign", "--push")
    res = json.loads(ok(alice.nagaya("build", "-t", target, "--push", "--sign", "--key", "main", "--json", str(c),
                                     env={**fresh, **env()}, timeout=600)).stdout)
    assert res["pushed"]["signed"]["digest"] == res["digest"]
    v = json.loads(ok(alice.nagaya("verify", target, "--key", "main", "--json")).stdout)
    assert v["digest"] == res["digest"]


def test_policy_on_compose(users: dict[str, SiteUser], policy: dict) -> None:
    """compose runs its services through `nagaya run`: the same refusal, and the signed stack comes up."""
    alice = users["alice"]
    d = alice.u.mkdir(alice.u.home / f"stack-{uuid.uuid4().hex[:6]}")
    for name, ref in (("unsigned", policy["refs"]["pol-unsigned"]), ("signed", policy["refs"]["pol-signed"])):
        (d / "compose.yaml").write_text(f"services:\n  app:\n    image: {ref}\n"
                                        "    command: [\"/bin/busybox\", \"true\"]\n")
        alice.u.chown_tree(d)
        r = alice.nagaya("compose", "up", cwd=d, env=policy["env"], timeout=120)
        if name == "unsigned":                 # the service fails; its own log has the one-line refusal
            assert r.returncode != 0 and "service app failed" in r.stderr, r.stderr
            logs = alice.nagaya("compose", "logs", "app", cwd=d, env=policy["env"], timeout=60)
            assert "refused by the site's image policy, rule 2" in logs.stdout + logs.stderr, logs
        else:
            assert r.returncode == 0, r.stderr
        alice.nagaya("compose", "down", cwd=d, env=policy["env"], timeout=60)


def test_robot_token_signs_with_a_project_key(site: Site, users: dict[str, SiteUser], work: Path) -> None:
    """CI: a push-scoped robot token of the project and the project's key (a file and its passphrase) sign;
    a pull-only token cannot store a signature."""
    alice, ci = users["alice"], users["bob"]
    project = f"trci{uuid.uuid4().hex[:6]}"
    ok(alice.nagaya("project", "create", project))
    r = ok(alice.nagaya("key", "create", "--project", project, "--json", env=env()))
    key = json.loads(r.stdout)
    ref = f"{site.registry}/{project}/app:1"
    digest = push(alice, work, ref)
    ci_key = ci.u.home / "project.key"
    shutil.copy(key["private"], ci_key)
    os.chown(ci_key, ci.u.uid, ci.u.gid)
    ci_key.chmod(0o600)
    for scope in ("pull", "push"):
        tok = json.loads(ok(alice.nagaya("token", "create", "--project", project, "--scope", scope,
                                         "--expires", "1d", "--json")).stdout)
        auth = ci.u.home / f"ci-auth-{scope}.json"
        raw = base64.b64encode(f"{tok['username']}:{tok['secret']}".encode()).decode()
        auth.write_text(json.dumps({"auths": {site.registry: {"auth": raw}}}))
        os.chown(auth, ci.u.uid, ci.u.gid)
        auth.chmod(0o600)
        r = ci.nagaya("sign", ref, "--key", str(ci_key), env={**env(), "NAGAYA_AUTH_FILE": str(auth)})
        if scope == "pull":
            refused(r, "denied")
        else:
            ok(r)
    v = json.loads(ok(alice.nagaya("verify", ref, "--key", project, "--json")).stdout)
    assert v["digest"] == digest
