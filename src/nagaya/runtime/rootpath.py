"""Resolve container paths to host paths, following symlinks the way the container would."""

from __future__ import annotations

import os
import posixpath
import stat

from nagaya.runtime.spec import Bind


class RootView:
    """The container's file system as seen from the host before it starts: a root plus binds."""

    def __init__(self, root: str, binds: list[Bind]) -> None:
        self.root = root
        self.found_host = ""                # host path of what find_command found last
        # Longest destination first, so that nested binds win.
        self.binds = sorted(binds, key=lambda b: len(b.dst), reverse=True)

    def host_path(self, path: str) -> str:
        """Map an absolute, symlink-free container path to the host path behind it."""
        for b in self.binds:
            if path == b.dst or path.startswith(b.dst.rstrip("/") + "/"):
                return b.src + path[len(b.dst.rstrip("/")):]
        return self.root + path

    def resolve(self, path: str, max_links: int = 40) -> str | None:
        """Resolve symlinks inside the container; None if a component is missing."""
        parts = [p for p in path.split("/") if p]
        done = "/"
        links = 0
        while parts:
            p = parts.pop(0)
            if p == ".":
                continue
            if p == "..":
                done = posixpath.dirname(done) or "/"
                continue
            cand = posixpath.join(done, p)
            try:
                st = os.lstat(self.host_path(cand))
            except OSError:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > max_links:
                    return None
                target = os.readlink(self.host_path(cand))
                parts = [x for x in target.split("/") if x] + parts
                done = "/" if target.startswith("/") else done
            else:
                done = cand
        return done

    def find_command(self, cmd: str, path_var: str, cwd: str) -> tuple[str | None, str]:
        """Locate `cmd` like execvp would. Returns (container path or None, reason)."""
        if "/" in cmd:
            full = cmd if cmd.startswith("/") else posixpath.join(cwd, cmd)
            return self._check_exec(full)
        last_reason = "not found"
        for d in (path_var or "/usr/local/bin:/usr/bin:/bin").split(":"):
            if not d:
                d = cwd
            found, reason = self._check_exec(posixpath.join(d, cmd))
            if found:
                return found, ""
            if reason != "not found":
                last_reason = reason
        return None, last_reason

    def _check_exec(self, path: str) -> tuple[str | None, str]:
        real = self.resolve(path)
        if real is None:
            return None, "not found"
        host = self.host_path(real)
        try:
            st = os.stat(host)
        except OSError:
            return None, "not found"
        if stat.S_ISDIR(st.st_mode):
            return None, "is a directory"
        if not os.access(host, os.X_OK):
            return None, "permission denied"
        self.found_host = host
        return path, ""
