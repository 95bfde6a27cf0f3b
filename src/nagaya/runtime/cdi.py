"""Container Device Interface specs (https://github.com/cncf-tags/container-device-interface), as Podman
applies them: `--device vendor.com/class=name` takes the named device's containerEdits and the spec's own.

Specs are JSON or YAML files in cfg.cdi_dirs (/etc/cdi, then /var/run/cdi, a later directory overriding
an earlier one for the same device, as the CDI library does), cdiVersion 0.3.0 to 0.8.0. A spec says which
device nodes, mounts and hooks a container gets, so only root's are trusted: every directory on the way
and the file itself must belong to root and be writable by nobody else (safefs), and links are not
followed. Parsed specs are cached per node by the files' identity, since YAML costs ~10 ms to load.
"""

from __future__ import annotations

import marshal
import os

from nagaya.errors import UsageError

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Any

VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.5.1", "0.6.0", "0.7.0", "0.8.0")
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
SPEC_MAX = 4 << 20


def is_device_name(text: str) -> bool:
    """vendor.com/class=name, as the CDI library's parser accepts it."""
    kind, eq, name = text.partition("=")
    vendor, slash, cls = kind.partition("/")
    return bool(eq and slash and vendor and cls and name) and "." in vendor


def _spec_files(dirs: list[str]) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[str]]:
    """(directory, file, identity) of each trusted spec file, and notes on those refused."""
    from nagaya import safefs

    out, notes = [], []
    for d in dirs:
        try:
            fd = safefs.open_dir(d)
        except FileNotFoundError:
            continue
        except (OSError, safefs.UnsafePath) as e:
            if os.path.isdir(d):
                notes.append(f"CDI directory {d} ignored: {safefs.describe(e)}")
            continue
        try:
            for name in sorted(os.listdir(fd)):
                if not name.endswith((".json", ".yaml", ".yml")):
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                out.append((d, name, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_uid, st.st_mode)))
        finally:
            os.close(fd)
    return out, notes


def load(dirs: list[str], cache_file: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """The trusted specs (each with "_file"), later directories last; notes on files refused."""
    files, notes = _spec_files(dirs)
    if not files:
        return [], notes
    key = (1, tuple(files))
    if cache_file:
        try:
            with open(cache_file, "rb") as f:
                saved = marshal.loads(f.read())
            if isinstance(saved, dict) and saved.get("key") == key:
                return saved["specs"], notes + saved["notes"]
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            pass
    from nagaya import safefs

    specs, file_notes = [], []
    for d, name, _ident in files:
        path = os.path.join(d, name)
        try:
            fd = safefs.open_dir(d)
            try:
                raw = safefs.read_at(fd, name, owners={0}, max_size=SPEC_MAX)
            finally:
                os.close(fd)
        except (OSError, safefs.UnsafePath) as e:
            file_notes.append(f"CDI spec {path} ignored: {safefs.describe(e)}")
            continue
        try:
            spec = _parse(raw, name)
            _validate(spec, path)
        except UsageError as e:
            file_notes.append(e.message)
            continue
        spec["_file"] = path
        specs.append(spec)
    if cache_file:
        try:
            os.makedirs(os.path.dirname(cache_file), mode=0o700, exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(marshal.dumps({"key": key, "specs": specs, "notes": file_notes}))
            os.replace(tmp, cache_file)
        except (OSError, ValueError):
            pass
    return specs, notes + file_notes


def _parse(raw: bytes, name: str) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace")
    try:
        if name.endswith(".json"):
            from nagaya.runtime.fastjson import loads

            doc = loads(text)
        else:
            import yaml

            doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception as e:                  # any parser error makes the file invalid
        raise UsageError(f"CDI spec {name} ignored: not valid {'JSON' if name.endswith('.json') else 'YAML'}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"CDI spec {name} ignored: not a mapping")
    return doc


def _validate(spec: dict[str, Any], path: str) -> None:
    v = str(spec.get("cdiVersion", ""))
    if v not in VERSIONS:
        raise UsageError(f"CDI spec {path} ignored: cdiVersion {v!r} is not one of {', '.join(VERSIONS)}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or not is_device_name(kind + "=x"):
        raise UsageError(f"CDI spec {path} ignored: kind {kind!r} is not vendor.com/class")
    devs = spec.get("devices")
    if not isinstance(devs, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in devs):
        raise UsageError(f"CDI spec {path} ignored: devices must be a list of named devices")
    for edits in [spec.get("containerEdits") or {}, *(d.get("containerEdits") or {} for d in devs)]:
        if not isinstance(edits, dict):
            raise UsageError(f"CDI spec {path} ignored: containerEdits must be a mapping")


def kinds(specs: list[dict[str, Any]]) -> set[str]:
    return {s["kind"] for s in specs}


def resolve(specs: list[dict[str, Any]], requests: list[str]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """For each requested vendor.com/class=name: (spec, [its edits]) — the spec-wide edits once per spec,
    then each device's. `name` "all" is the spec's device of that name, or else every device of the kind."""
    by_kind: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {}
    for s in specs:                         # later files override earlier ones device by device
        for d in s["devices"]:
            by_kind.setdefault(s["kind"], {})[d["name"]] = (s, d)
    chosen: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for req in requests:
        kind, _, name = req.partition("=")
        devs = by_kind.get(kind)
        if not devs:
            raise UsageError(f"--device {req}: no CDI spec for {kind} in the site's CDI directories")
        if name in devs:
            picked = [devs[name]]
        elif name == "all":
            picked = list(devs.values())
        else:
            raise UsageError(f"--device {req}: {kind} has no device {name!r} (has: {', '.join(sorted(devs))})")
        for p in picked:
            if all(p[1] is not c[1] for c in chosen):
                chosen.append(p)
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for s, d in chosen:
        for entry in out:
            if entry[0] is s:
                entry[1].append(d.get("containerEdits") or {})
                break
        else:
            out.append((s, [s.get("containerEdits") or {}, d.get("containerEdits") or {}]))
    return out
