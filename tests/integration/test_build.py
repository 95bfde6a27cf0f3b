"""`nagaya build` (rootless buildah) and `nagaya image export`, as unprivileged test users.

Dockerfiles and Apptainer definition files are built from local busybox bases and from the site registry,
run with `nagaya run`, rebuilt from cache, broken on purpose (errors name FILE:LINE and leave nothing
behind), and exported to one file that imports on a fresh cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.site.conftest import Site, SiteUser, ensure_user

pytestmark = pytest.mark.integration

DOCKERFILE = """\
# syntax and comments are fine
ARG BASE=bb
FROM ${BASE}
ARG FLAVOUR=plain
ENV GREETING="hello there" \\
    FLAVOUR=${FLAVOUR}
WORKDIR /opt/app
COPY data.txt ./data.txt
COPY tools/ /opt/tools/
RUN mkdir -p /data && chown 1234:1234 /data && \\
    echo "built as $(id -u)" > /opt/app/built.txt
USER 1234:1234
RUN id -u > /data/uid
ENTRYPOINT ["/bin/sh", "-c", \\
            "echo \\"$GREETING/$FLAVOUR\\"; pwd; cat data.txt built.txt /data/uid; /opt/tools/t.sh; \\
             echo args: \\"$@\\"", \\
            "ep"]
CMD ["a", "b"]
"""

DEFFILE = """\
Bootstrap: localimage
From: bb

%files
    files/payload.txt /opt/payload.txt

%post
    echo "post ran as $(id -u)" > /opt/post.txt
    for i in 1 2; do
        echo "loop $i" >> /opt/post.txt
    done

%environment
    export APP_MODE=production
    APP_NAME="my app"

%runscript
    echo "runscript: $APP_MODE / $APP_NAME / args: $*"
    cat /opt/payload.txt /opt/post.txt

%labels
    Author alice@example.org
    Version 1.2

%help
    Run me with arguments.

%test
    test -f /opt/post.txt
"""


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-3000:]}\n{r.stdout[-1000:]}"
    return r


def write(u: User, path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    os.chown(path.parent, u.uid, u.gid)
    os.chown(path, u.uid, u.gid)
    return path


def buildah_containers(u: User, env: dict[str, str]) -> list[str]:
    storage = Path(env["XDG_CACHE_HOME"]) / "nagaya" / "build" / "storage"
    r = ok(u.run(["buildah", "--root", str(storage), "--runroot", f"/tmp/nagaya-buildah-{u.uid}",
                  "--storage-driver", "overlay", "containers", "--quiet"], env=env))
    return r.stdout.split()


def tags(u: User, env: dict[str, str]) -> set[str]:
    return {f"{i['name']}:{i['tag']}" for i in json.loads(ok(u.nagaya("images", "--json", env=env)).stdout)}


@pytest.fixture
def ctx(alice: User, workdir: Path, rootfs: Path, fresh_cache: dict[str, str]) -> Path:
    """A build context owned by alice, and `bb` (busybox) in her fresh cache."""
    ok(alice.nagaya("image", "import", str(rootfs), "--name", "bb", env=fresh_cache))
    c = alice.mkdir(workdir / "ctx")
    write(alice, c / "data.txt", "data from the context\n")
    write(alice, c / "tools" / "t.sh", "#!/bin/sh\necho tool ran\n", 0o755)
    write(alice, c / "files" / "payload.txt", "payload\n")
    return c


def test_dockerfile_build_run_and_cached_rebuild(alice: User, ctx: Path, fresh_cache: dict[str, str]) -> None:
    env = fresh_cache
    write(alice, ctx / "Dockerfile", DOCKERFILE)
    r = ok(alice.nagaya("build", "-t", "web:1", "--build-arg", "FLAVOUR=spicy", "--json", str(ctx), env=env))
    res = json.loads(r.stdout)
    assert res["ref"] == "web:1" and res["kind"] == "dockerfile" and res["cached_steps"] == 0
    assert "STEP 1/" in r.stderr                        # buildah's output streams through
    run = ok(alice.nagaya("run", "web:1", env=env, cwd=ctx))
    assert run.stdout.splitlines() == ["hello there/spicy", "/opt/app", "data from the context", "built as 0",
                                       "1234", "tool ran", "args: a b"]
    assert ok(alice.nagaya("run", "web:1", "x", env=env, cwd=ctx)).stdout.endswith("args: x\n")
    info = json.loads(ok(alice.nagaya("image", "inspect", "web:1", env=env)).stdout)
    assert info["user"] == "1234:1234" and info["workdir"] == "/opt/app" and info["cmd"] == ["a", "b"]
    assert "GREETING=hello there" in info["env"] and "FLAVOUR=spicy" in info["env"]

    again = ok(alice.nagaya("build", "-t", "web:1", "--build-arg", "FLAVOUR=spicy", "--json", str(ctx), env=env))
    res2 = json.loads(again.stdout)
    # Every step after FROM comes from buildah's layer cache, and the image is the same image.
    assert res2["cached_steps"] == res2["steps"] - 1 == again.stderr.count("--> Using cache")
    assert res2["digest"] == res["digest"]

    nc = ok(alice.nagaya("build", "-t", "web:2", "--build-arg", "FLAVOUR=spicy", "--no-cache", "--json", str(ctx),
                         env=env))
    assert json.loads(nc.stdout)["cached_steps"] == 0 and "Using cache" not in nc.stderr
    assert buildah_containers(alice, env) == []


def test_definition_file_every_section(alice: User, ctx: Path, fresh_cache: dict[str, str]) -> None:
    env = fresh_cache
    write(alice, ctx / "app.def", DEFFILE)
    res = json.loads(ok(alice.nagaya("build", "-f", str(ctx / "app.def"), "-t", "tool:1", "--json", str(ctx),
                                     env=env)).stdout)
    assert res["kind"] == "definition"
    run = ok(alice.nagaya("run", "tool:1", "x", "y", env=env, cwd=ctx))    # the runscript runs by default
    assert run.stdout.splitlines() == ["runscript: production / my app / args: x y", "payload",
                                       "post ran as 0", "loop 1", "loop 2"]
    # exec bypasses the runscript, as in Apptainer; %help and %environment keep Apptainer's locations
    help_ = ok(alice.nagaya("exec", "tool:1", "cat", "/.singularity.d/runscript.help", env=env, cwd=ctx))
    assert help_.stdout == "Run me with arguments.\n"
    envsh = ok(alice.nagaya("exec", "tool:1", "cat", "/.singularity.d/env/90-environment.sh", env=env, cwd=ctx))
    assert "export APP_MODE=production" in envsh.stdout
    info = json.loads(ok(alice.nagaya("image", "inspect", "tool:1", env=env)).stdout)
    assert info["labels"]["Author"] == "alice@example.org" and info["labels"]["Version"] == "1.2"
    assert info["entrypoint"] == ["/.singularity.d/runscript"]


def test_failing_run_names_file_line_command_and_leaves_nothing(alice: User, ctx: Path,
                                                                 fresh_cache: dict[str, str]) -> None:
    env = fresh_cache
    df = write(alice, ctx / "Broken.Dockerfile", "FROM bb\nRUN echo one > /one\nRUN echo about to fail && \\\n"
                                                 "    false\nRUN echo never\n")
    before = tags(alice, env)
    r = alice.nagaya("build", "-f", str(df), "-t", "broken:1", str(ctx), env=env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"nagaya: {df}:3: RUN echo about to fail && false failed (exit status 1)"
    assert "never" not in r.stderr
    assert tags(alice, env) == before
    assert buildah_containers(alice, env) == []

    bad_post = write(alice, ctx / "bad.def", "Bootstrap: docker\nFrom: bb\n\n%post\n    echo start\n"
                                             "    ls /nonexistent\n    echo never\n")
    r = alice.nagaya("build", "-f", str(bad_post), "-t", "broken:2", str(ctx), env=env)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"nagaya: {bad_post}:6: %post: `ls /nonexistent` failed (exit status 1)"
    assert tags(alice, env) == before
    assert buildah_containers(alice, env) == []


MALFORMED = [
    ("Dockerfile", "FROM bb\nRUN true\nFORM bb\n", 3, "unknown instruction 'FORM'"),
    ("Dockerfile", "# c\nRUN true\nFROM bb\n", 2, "RUN before the first FROM"),
    ("Dockerfile", "FROM bb\n\nCMD [\"a', \"b\"]\n", 3, "is not one"),
    ("Dockerfile", "FROM bb\nENV A\n", 2, "ENV: expected KEY=VALUE"),
    ("Dockerfile", "FROM bb\nCOPY onlyone\n", 2, "COPY: needs at least one source and a destination"),
    ("Dockerfile", "FROM bb AS\n", 1, "FROM: expected"),
    ("Dockerfile", "FROM bb\nRUN echo \\\n  ok\nWORKDIR a b\n", 4, "WORKDIR: takes exactly one argument"),
    ("Dockerfile", "# only a comment\n", 1, "no FROM instruction"),
    ("x.def", "Bootstrap: docker\nFrom: bb\n%post\n  true\n%bogus\n", 5, "unknown section %bogus"),
    ("x.def", "Bootstrap: library\nFrom: bb\n", 1, "Bootstrap: 'library' is not supported"),
    ("x.def", "Bootstrap: docker\n\n%post\n  true\n", 1, "missing `From:` header"),
    ("x.def", "Bootstrap: docker\nFrom: bb\nColour: red\n", 3, "unknown header 'Colour'"),
    ("x.def", "Bootstrap: docker\nFrom: bb\n%setup\n  touch $ROOTFS/x\n", 3, "%setup is not supported"),
    ("x.def", "Bootstrap: docker\nFrom: bb\n%environment\n  export A=1\n  if true; then B=2; fi\n", 5,
     "%environment: only"),
    ("x.def", "Bootstrap: docker\nFrom: bb\n%files\n  /etc/hostname /x\n", 4, "outside the build context"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), MALFORMED)
def test_malformed_build_files_give_line_numbers(alice: User, workdir: Path, name: str, text: str, line: int,
                                                 message: str) -> None:
    c = alice.mkdir(workdir / f"m-{uuid.uuid4().hex[:6]}")
    f = write(alice, c / name, text)
    r = alice.nagaya("build", "-f", str(f), "-t", "m:1", str(c))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"nagaya: {f}:{line}: "), r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_base_names_the_line(alice: User, ctx: Path, fresh_cache: dict[str, str]) -> None:
    df = write(alice, ctx / "Nobase", "FROM bb\nFROM no-such-image:9 AS two\n")
    r = alice.nagaya("build", "-f", str(df), "-t", "x:1", str(ctx), env=fresh_cache)
    assert r.returncode == 3 and f"{df}:2: FROM no-such-image:9: base image" in r.stderr


def test_export_then_import_on_fresh_cache_then_run(alice: User, ctx: Path, workdir: Path,
                                                    fresh_cache: dict[str, str]) -> None:
    env = fresh_cache
    write(alice, ctx / "app.def", DEFFILE)
    built = json.loads(ok(alice.nagaya("build", "-t", "dl:3", "--json", str(ctx), env=env)).stdout)
    out = workdir / "dl.tar"
    exp = json.loads(ok(alice.nagaya("image", "export", "dl:3", "-o", str(out), "--json", env=env)).stdout)
    assert exp["digest"] == built["digest"] and exp["format"] == "oci-archive" and out.stat().st_size == exp["size"]
    other = {"XDG_CACHE_HOME": str(alice.mkdir(workdir / "other-cache"))}
    imp = json.loads(ok(alice.nagaya("image", "import", str(out), "--name", "mine:1", "--json", env=other)).stdout)
    assert imp["digest"] == built["digest"]                    # the same image, digest and all
    r = ok(alice.nagaya("run", "mine:1", "z", env=other, cwd=workdir))
    assert r.stdout.startswith("runscript: production / my app / args: z\npayload\n")
    bad = alice.nagaya("image", "export", "nope:1", "-o", str(workdir / "n.tar"), env=env)
    assert bad.returncode == 3 and not (workdir / "n.tar").exists()


@pytest.fixture(scope="module")
def nosub(system: None) -> User:
    """A user with no subordinate id range (useradd gives new users one; it is removed here)."""
    u = User.ensure("nagaya-nosub", 700000)
    for f in ("/etc/subuid", "/etc/subgid"):
        lines = Path(f).read_text().splitlines(keepends=True)
        Path(f).write_text("".join(x for x in lines if not x.startswith(("nagaya-nosub:", f"{u.uid}:"))))
    return u


def test_user_without_subids_gets_one_line_error(nosub: User, rootfs: Path) -> None:
    c = nosub.home / "ctx"
    nosub.mkdir(c)
    write(nosub, c / "Dockerfile", "FROM bb\nRUN true\n")
    ok(nosub.nagaya("image", "import", str(rootfs), "--name", "bb"))
    r = nosub.nagaya("build", "-t", "x:1", str(c))
    assert r.returncode == 6
    assert r.stderr.count("\n") == 1 and "nagaya admin subid nagaya-nosub" in r.stderr, r.stderr
    shutil.rmtree(nosub.home / ".cache", ignore_errors=True)


# ---- with the site registry --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builder(site: Site, system: None) -> SiteUser:
    u = ensure_user("nyb-builder", f"pw-nyb-{os.getpid()}")
    subprocess.run(["usermod", "--add-subuids", "600000-665535", "--add-subgids", "600000-665535", u.name],
                   check=True, capture_output=True)
    u.login(site.server)
    return u


def fresh(u: SiteUser) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(u.u.mkdir(u.u.home / f"cache-{uuid.uuid4().hex[:8]}"))}


@pytest.mark.parametrize("kind", ["dockerfile", "definition"])
def test_registry_base_build_push_pull_run(site: Site, builder: SiteUser, rootfs: Path, kind: str) -> None:
    u = builder.u
    base = f"{site.registry}/{u.name}/base:1"
    env = fresh(builder)
    ok(u.nagaya("image", "import", str(rootfs), "--name", "bb", env=env))
    ok(u.nagaya("push", "bb", base, env=env))

    c = u.mkdir(u.home / f"ctx-{uuid.uuid4().hex[:6]}")
    write(u, c / "files" / "payload.txt", "payload\n")
    if kind == "dockerfile":
        write(u, c / "Containerfile", f"FROM {base}\nCOPY files/payload.txt /p.txt\nRUN echo built >> /p.txt\n"
                                      'CMD ["cat", "/p.txt"]\n')
        expect = "payload\nbuilt\n"
    else:
        write(u, c / "x.def", f"Bootstrap: docker\nFrom: {base}\n%files\n  files/payload.txt /p.txt\n"
                              "%post\n  echo built >> /p.txt\n%runscript\n  echo run:; cat /p.txt\n")
        expect = "run:\npayload\nbuilt\n"
    target = f"{site.registry}/{u.name}/built-{kind}:1"
    build_env = fresh(builder)                  # the base comes from the registry, not from a local import
    res = json.loads(ok(u.nagaya("build", "-t", target, "--push", "--json", str(c), env=build_env)).stdout)
    assert res["pushed"]["digest"] == res["digest"]

    clean = fresh(builder)
    pulled = json.loads(ok(u.nagaya("pull", target, "--json", env=clean)).stdout)
    assert pulled["digest"] == res["digest"]
    assert ok(u.nagaya("run", target, env=clean, cwd=c)).stdout == expect


def test_push_needs_a_registry_name(alice: User, ctx: Path, fresh_cache: dict[str, str]) -> None:
    write(alice, ctx / "Dockerfile", "FROM bb\n")
    r = alice.nagaya("build", "-t", "plain:1", "--push", str(ctx), env=fresh_cache)
    assert r.returncode == 2 and "names no registry" in r.stderr


def test_build_section_of_config_picks_storage(alice: User, ctx: Path, workdir: Path,
                                               fresh_cache: dict[str, str]) -> None:
    storage = workdir / "vfs-storage"
    env = {**fresh_cache, "NAGAYA_BUILD_STORAGE_DRIVER": "vfs", "NAGAYA_BUILD_STORAGE_DIR": str(storage)}
    write(alice, ctx / "Dockerfile", "FROM bb\nRUN echo vfs > /v.txt\nCMD [\"cat\", \"/v.txt\"]\n")
    ok(alice.nagaya("build", "-t", "v:1", str(ctx), env=env))
    assert (storage / "vfs").is_dir() and not (Path(fresh_cache["XDG_CACHE_HOME"]) / "nagaya" / "build").exists()
    assert ok(alice.nagaya("run", "v:1", env=env, cwd=ctx)).stdout == "vfs\n"
