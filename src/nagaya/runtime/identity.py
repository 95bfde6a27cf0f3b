"""Who the user is inside the container: themself, with passwd/group entries generated for the image."""

from __future__ import annotations

import grp
import os
import pwd

from nagaya.record import Record

TYPE_CHECKING = False       # pathlib stays unimported on the run path
if TYPE_CHECKING:
    from pathlib import Path


class Identity(Record):
    _frozen = True

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str
    shell: str
    gecos: str = ""

    @classmethod
    def current(cls) -> Identity:
        uid, gid = os.getuid(), os.getgid()
        try:
            pw = pwd.getpwuid(uid)
            name, home, shell, gecos = pw.pw_name, pw.pw_dir, pw.pw_shell, pw.pw_gecos
        except KeyError:
            name, home, shell, gecos = f"u{uid}", os.environ.get("HOME", "/"), "/bin/sh", ""
        home = os.environ.get("HOME") or home
        groups = tuple(g for g in os.getgroups() if g != gid)
        return cls(uid, gid, groups, name, home, shell, gecos)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"g{gid}"


def passwd_file(image_passwd: str, ident: Identity, shell: str) -> str:
    keep = []
    for line in image_passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and (parts[0] == ident.name or parts[2] == str(ident.uid)):
            continue
        if line.strip():
            keep.append(line)
    keep.append(f"{ident.name}:x:{ident.uid}:{ident.gid}:{ident.gecos}:{ident.home}:{shell}")
    return "\n".join(keep) + "\n"


def group_file(image_group: str, ident: Identity) -> str:
    mine = {ident.gid: [], **{g: [ident.name] for g in ident.groups}}
    keep = []
    for line in image_group.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and int(parts[2]) in mine:
            continue
        if line.strip():
            keep.append(line)
    for gid, members in mine.items():
        keep.append(f"{_group_name(gid)}:x:{gid}:{','.join(members)}")
    return "\n".join(keep) + "\n"


def read_image_file(root: str | Path, rel: str) -> str:
    try:
        with open(os.path.join(root, rel), errors="replace") as f:
            return f.read()
    except OSError:
        return ""
