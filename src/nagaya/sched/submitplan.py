"""The submit plan for the compiled starter (src/starter/submit.c): `nagaya submit` on Grid Engine and PBS
without starting Python.

A plain `nagaya submit [--backend gridengine|pbs] --image NAME -- CMD...` of a local image submits the same
job every time but for the command, the job's name (the command's base name) and the working directory:
after such a submit, and only when the compiled starter asked (NAGAYA_STARTER_PLAN=want), this module writes
down the qsub argv and the job's wrapper as templates with those three left open, what the job record and
the audit record take, and everything the result depended on (config files, /etc/passwd, the image's tag and
files, the `nagaya` the job runs and the qsub called, PATH, TZ, nagaya's own sources). The starter replays it
when every dependency is unchanged and otherwise execs this Python CLI, which decides as always.

The plan lives beside the run plans ($XDG_CACHE_HOME/nagaya/starter, 0700, the user's own) and is read only
by the same user's starter, under the same rules (THREAT_MODEL B27). Before a plan is written the templates
are filled in with this submit's values and must give exactly the wrapper and the argv that were submitted.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from nagaya.runtime.fastplan import _dep, _line, open_plan_dir, plan_dir_path

FORMAT = "nagaya-submit-plan 1"
CMD, NAME, CWD = "@NAGAYA_SUBMIT_CMD@", "NAGAYASUBMITNAME", "/NAGAYA_SUBMIT_CWD"
ENV_DEPS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "SLURMD_NODENAME", "PATH", "TZ",
            "SGE_ROOT", "SGE_CELL", "PBS_CONF_FILE", "LANG", "LC_ALL", "LC_CTYPE")
# Sources whose change may change what a submit does: a plan made by older code is not replayed.
_SOURCES = ("cli/entry.py", "cli/submit_fast.py", "sched/__init__.py", "sched/submit.py", "sched/submitplan.py",
            "sched/batchwrap.py", "sched/gpulock.py", "sched/gridengine.py", "sched/pbs.py", "sched/models.py",
            "sched/slurm.py", "sched/local.py", "image/resolve.py", "image/reference.py", "image/store.py",
            "client/site_audit.py", "client/authfile.py", "runtime/fastplan.py", "runtime/fastjson.py", "config.py",
            "audit.py", "record.py", "errors.py", "safefs.py")


def plan_name(backend: str, image: str, node: str) -> str:
    """FNV-1a 64 of `submit NUL backend NUL image NUL node`, as the starter computes it."""
    h = 0xCBF29CE484222325
    for b in b"submit\0" + backend.encode() + b"\0" + image.encode() + b"\0" + node.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}.submit"


def _plain(s: str) -> bool:
    """Printable ASCII only: what the starter quotes, names and encodes exactly as Python does."""
    return all(" " <= c <= "~" for c in s)


def replayable(req: Any, cfg: Any, backend: str, cli_backend: str) -> bool:
    """Whether a submit of this form is one the starter replays (the options it parses, nothing else)."""
    if backend not in ("pbs", "gridengine") or not req.image or not req.args or req.compose is not None:
        return False
    if any(getattr(req, k) is not None for k in ("nodes", "ntasks", "cpus", "mem", "gpus", "time_limit",
                                                  "partition", "name", "array", "after")):
        return False
    if cfg.image.policy or cfg.image.vuln_block or (cfg.sched.nagaya and not os.path.isabs(cfg.sched.nagaya)):
        return False
    if any(k.startswith("NAGAYA_") and k != "NAGAYA_STARTER" for k in os.environ):
        return False
    from nagaya.image.reference import parse

    try:
        ref = parse(req.image)
    except Exception:
        return False
    if ref.registry or not all(_plain(x) for x in (req.image, cli_backend, os.getcwd(), *req.args)):
        return False
    from nagaya.client import authfile

    return not os.path.lexists(authfile.path())     # a login: the record is forwarded to the site


def fill(text: str, command: list[str], name: str, cwd: str) -> str:
    return text.replace(CMD, " ".join(shlex.quote(a) for a in command)).replace(NAME, name).replace(CWD, cwd)


def write(req: Any, cfg: Any, sched: Any, spec: Any, cli_backend: str, submitted: tuple[list[str], str]) -> None:
    """Write the plan for this submit (already done, by the Python path); any doubt: no plan."""
    import copy
    import pwd
    import shutil

    from nagaya import config, safefs
    from nagaya.client import authfile
    from nagaya.image.reference import parse

    t = copy.copy(spec)
    t.command, t.name, t.cwd = [CMD], NAME, CWD
    script, args = sched.batch_script(t), sched.args(t)
    name = submitted_name(sched, spec)
    real_args, real_script = submitted
    if fill(script, spec.command, name, spec.cwd) != real_script or \
            [fill(a, spec.command, name, spec.cwd) for a in args] != real_args or script.count(CMD) != 1:
        return
    if any((NAME in a and a != NAME) or (CWD in a and a != CWD) or CMD in a for a in args) or NAME in script \
            or CWD in script:
        return
    mode = "argv" if sched.name == "pbs" else "stdin"
    qsub = sched._bin("qsub")
    dfd = open_plan_dir()
    if dfd is None:
        return
    node = os.uname().nodename
    uid = os.getuid()
    pw = pwd.getpwuid(uid)
    umask = os.umask(0)
    os.umask(umask)
    env = sched._env() or {}
    groups = ",".join(str(g) for g in sorted(x for x in os.getgroups() if x != os.getgid()))
    parts = [FORMAT + "\n", _line("key", cli_backend, req.image, node),
             _line("ident", uid, os.getgid(), groups, pw.pw_name, os.environ.get("HOME", "")),
             _line("umask", umask), _line("backend", sched.name), _line("qsub", qsub), _line("mode", mode),
             _line("namemax", 230 if sched.name == "pbs" else 0), _line("statedir", str(sched.state)),
             _line("ref", spec.ref), _line("digest", spec.digest), _line("image", spec.image),
             _line("audit_file", cfg.audit_file), _line("audit_site", cfg.audit.site_dir or ""),
             _line("audit_syslog", int(bool(cfg.audit.syslog)))]
    parts += [_line("setenv", k, v) for k, v in env.items() if os.environ.get(k) != v]
    for k in ENV_DEPS:
        v = os.environ.get(k)
        parts.append(_line("envdep", k, v) if v is not None else _line("envunset", k))
    parts += [_line("arg", a) for a in args]
    parts.append(_line("script", script))
    import nagaya

    pkg = os.path.dirname(os.path.realpath(nagaya.__file__))
    site_cfg = str(getattr(config, "SITE_CONFIG", config._SITE_CONFIG))
    user_cfg = os.path.join(config._user_dir_strs()[1], "nagaya", "nagaya.toml")
    deps = [site_cfg, user_cfg, "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", qsub,
            str(authfile.path()), *(os.path.join(pkg, s) for s in _SOURCES)]
    # the `nagaya` the job runs: [sched] nagaya, else the first on PATH (every directory searched before it)
    exe = cfg.sched.nagaya or shutil.which("nagaya")
    if not exe:
        return
    deps.append(exe)
    if not cfg.sched.nagaya:
        for d in os.environ.get("PATH", "").split(":"):
            if not os.path.isabs(d):
                return          # a relative directory: found from wherever the user stands
            deps.append(d)
            if os.path.join(d, "nagaya") == exe:
                break
    ref = parse(req.image)
    if not ref.digest:
        deps.append(os.path.join(cfg.cache_root, "refs", ref.name, ref.tag_or_latest))
    parts += [_dep(d) for d in dict.fromkeys(deps)]
    parts.append(_dep(os.path.join(cfg.cache_root, "images", spec.digest[7:] + ".json"), mtime=False))
    parts.append("end\n")
    try:
        safefs.write_at(dfd, plan_name(cli_backend, req.image, node), "".join(parts).encode(), mode=0o600)
    except (OSError, safefs.UnsafePath):
        pass
    finally:
        os.close(dfd)


def submitted_name(sched: Any, spec: Any) -> str:
    from nagaya.sched.batchwrap import job_name

    name = job_name(spec.name or "nagaya")
    return name[:230] if sched.name == "pbs" else name


__all__ = ["plan_dir_path", "plan_name", "replayable", "write"]
