"""The container's environment, Apptainer-like: host variables pass, the image's ENV wins over them,
NAGAYAENV_K and --env K=V win over both; --cleanenv keeps only a few host variables."""

from __future__ import annotations

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host values that would break or subvert the image's own programs.
DROP = {"PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT", "PS1", "PROMPT_COMMAND", "BASH_ENV", "ENV",
        "PYTHONHOME"}
CLEANENV_KEEP = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LC_ALL", "TZ", "DISPLAY")


def build(host: dict[str, str], image_env: tuple[str, ...], user_env: dict[str, str], cleanenv: bool,
          home: str, user: str) -> dict[str, str]:
    env: dict[str, str] = {}
    if cleanenv:
        env = {k: host[k] for k in CLEANENV_KEEP if k in host}
    else:
        env = {k: v for k, v in host.items()
               if k not in DROP and not k.startswith(("NAGAYAENV_", "BASH_FUNC_"))}
    for item in image_env:
        k, sep, v = item.partition("=")
        if sep and k:
            env[k] = v
    if not cleanenv:
        for k, v in host.items():
            if k.startswith("NAGAYAENV_") and len(k) > 10:
                env[k[10:]] = v
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOME"] = home
    env.setdefault("USER", user)
    env.setdefault("LOGNAME", user)
    env.update(user_env)
    return env
