"""Unprivileged test users: every user-facing command in the tests runs as one of them."""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ensure(cls, name: str, subid_start: int) -> User:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            # No automatic subordinate range: the one added below is the user's only one (an automatic range
            # that overlaps it makes buildah's uid_map invalid, depending on which users were made first).
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0",
                            name], check=True)
            pw = pwd.getpwnam(name)
        subprocess.run(["usermod", "--add-subuids", f"{subid_start}-{subid_start + 65535}",
                        "--add-subgids", f"{subid_start}-{subid_start + 65535}", name], check=False,
                       capture_output=True)
        return cls(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))

    def env(self, **extra: str) -> dict[str, str]:
        # NAGAYA_TEST_BIN (optional): a directory whose `nagaya` the users run before the installed one, so a
        # worktree's code is what the tests exercise (its jobs find the same `nagaya` on PATH).
        first = os.environ.get("NAGAYA_TEST_BIN", "")
        e = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
             "PATH": f"{first}:{PATH}" if first else PATH, "LANG": "C.UTF-8", "TERM": "xterm"}
        if os.environ.get("NAGAYA_TEST_SQUASHFS"):
            # a build of nagaya-squashfs under test (tests/conftest.py): every run uses it (the Python launcher's)
            e["NAGAYA_RUNTIME_SQUASHFUSE"] = os.environ["NAGAYA_TEST_SQUASHFS"]
        e.update(self.extra_env)
        e.update(extra)
        return e

    def argv(self, args: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *args]

    def run(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
            input: str | bytes | None = None, timeout: float = 120, check: bool = False,
            text: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args), env=self.env(**(env or {})), cwd=cwd or self.home,
                              input=input, capture_output=True, text=text, timeout=timeout, check=check)

    def popen(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
              **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(args), env=self.env(**(env or {})), cwd=cwd or self.home, **kw)

    def nagaya(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["nagaya", *args], **kw)

    def processes(self, keepers: bool = False) -> list[str]:
        """This user's processes (pid, state and command), to prove nothing was left behind. The user's image
        keepers (nagaya-keeper, runtime/keeper.py) and the FUSE servers they started outlive runs by design,
        and are left out unless `keepers`; tests/integration/test_keeper.py proves that they end."""
        r = subprocess.run(["ps", "-u", str(self.uid), "-o", "pid=,ppid=,stat=,args="], capture_output=True,
                           text=True)
        rows = [x.split(None, 3) for x in r.stdout.splitlines() if len(x.split(None, 3)) == 4]
        kept = {p for p, _pp, _st, args in rows if args.split()[0].endswith("nagaya-keeper")}
        return [f"{p} {st} {args}" for p, pp, st, args in rows
                if not st.startswith("Z") and (keepers or (p not in kept and pp not in kept))]

    def mkdir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path

    def chown_tree(self, path: Path) -> None:
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for n in dirs + files:
                os.lchown(os.path.join(root, n), self.uid, self.gid)
