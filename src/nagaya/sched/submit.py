"""What `nagaya submit` does, apart from parsing: find the script form, pin the image to its digest, build
the JobSpec, hand it to the scheduler and write the audit record. Shared by the lean command-line path
(cli/submit_fast.py, no Typer or Rich) and the Typer command that renders --help."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from nagaya.errors import UsageError
from nagaya.record import Factory, Record


class SubmitRequest(Record):
    args: list[str] = Factory(list)     # CMD ARGS..., or SCRIPT ARGS...
    image: str | None = None
    nodes: int | None = None
    ntasks: int | None = None
    cpus: int | None = None
    mem: str | None = None
    gpus: str | None = None
    time_limit: str | None = None
    partition: str | None = None
    name: str | None = None
    compose: str | None = None
    backend: str | None = None
    array: str | None = None
    after: str | None = None


def find_script(args: list[str]) -> tuple[Path, str] | None:
    """The script form: the first argument is a file on this machine that carries #NAGAYA/#SBATCH/#PBS/#$ lines."""
    if not args:
        return None
    p = Path(args[0])
    try:
        if not p.is_file() or p.stat().st_size > 1 << 20:
            return None
        text = p.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    head = [x.strip() for x in text.splitlines()[:200]]
    return (p, text) if any(x.startswith(("#NAGAYA", "#SBATCH", "#PBS", "#$")) for x in head) else None


def _compose_check(path: Path, nodes: int) -> str:
    """`submit --compose`: refuse a bad file or an impossible placement now, not once the job starts."""
    from nagaya.compose.placement import place
    from nagaya.compose.spec import load

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    place(load(path), [f"node{i}" for i in range(1, nodes + 1)])
    return str(path)


def submit_job(req: SubmitRequest, cfg: Any = None, want_plan: bool = False) -> dict[str, Any]:
    """Submit; returns what `--json` prints: {"id", "backend", "image", "digest"}. `want_plan`: the compiled
    starter asked for a submit plan (sched/submitplan.py), written if this submit is one it can replay."""
    from nagaya import audit, config
    from nagaya.sched import get_scheduler
    from nagaya.sched.models import JobSpec, parse_script, parse_time

    args = list(req.args)
    script = find_script(args)
    directives: dict[str, str] = {}
    sbatch: dict[str, str] = {}
    if script:
        directives, sbatch = parse_script(script[1], str(script[0]))
    image = req.image or directives.get("image")
    compose = Path(req.compose) if req.compose is not None else None
    ntasks = req.ntasks
    if compose is not None:
        image, args = _compose_check(compose, req.nodes or 1), []
        ntasks = ntasks or req.nodes        # one task per node: the replicas' steps overlap it
    if not image:
        raise UsageError("no image: give --image REF (or a `#NAGAYA --image REF` line in the script)")
    if not script and not args and compose is None:
        raise UsageError("nothing to run: nagaya submit --image REF -- CMD [ARGS]...  or  nagaya submit SCRIPT")
    cfg = cfg or config.load()
    sched = get_scheduler(cfg, req.backend or directives.get("backend"))
    if compose is None:
        from nagaya.image.resolve import pin as pin_image

        ref, digest = pin_image(cfg, image)
        if cfg.image.policy or cfg.image.vuln_block:    # refused now, not on the node (`nagaya run` checks again)
            from nagaya.trust.gate import admit

            admit(cfg, ref, digest)
    else:
        ref, digest = str(compose.resolve()), ""

    def pick(cli: object, key: str, default: str) -> str:
        return str(cli) if cli is not None else sbatch.get(key, default)

    def num(cli: int | None, key: str) -> int:
        v = pick(cli, key, "1")
        try:
            return max(1, int(v.split("-")[0]))
        except ValueError:
            raise UsageError(f"invalid {key} {v!r}") from None

    me = pwd.getpwuid(os.getuid()).pw_name
    spec = JobSpec(image=image, ref=ref, digest=digest, command=args if not script else [],
                   script=script[1] if script else "", script_name=script[0].name if script else "",
                   nodes=num(req.nodes, "nodes"), ntasks=num(ntasks, "ntasks"), cpus=num(req.cpus, "cpus"),
                   mem=pick(req.mem, "mem", ""), gpus=pick(req.gpus, "gpus", ""),
                   time_limit=parse_time(pick(req.time_limit, "time", "")),
                   partition=pick(req.partition, "partition", cfg.sched.partition),
                   name=pick(req.name, "name", script[0].name if script else Path(args[0] if args else image).name),
                   cwd=os.getcwd(), env=dict(os.environ), user=me,
                   compose=str(compose.resolve()) if compose is not None else "")
    if script:
        spec.command = args[1:]             # the script's own arguments
    spec.array, spec.after = req.array or "", req.after or ""
    job_id = sched.submit(spec)
    ev = audit.AuditEvent(action="submit", user=me, uid=os.getuid(), image=image, digest=digest,
                          command=spec.command if not script else [str(script[0]), *args[1:]],
                          cwd=spec.cwd, details={"job": job_id, "backend": sched.name,
                                                 "nodes": spec.nodes, "ntasks": spec.ntasks,
                                                 "cpus": spec.cpus, "mem": spec.mem, "gpus": spec.gpus,
                                                 "time_limit": spec.time_limit, "array": spec.array,
                                                 "after": spec.after})
    audit.record(ev, cfg)
    from nagaya.client.site_audit import forward

    forward(ev)
    if want_plan and not script and getattr(sched, "submitted", None):
        from nagaya.sched import submitplan

        if submitplan.replayable(req, cfg, sched.name, req.backend or ""):
            submitplan.write(req, cfg, sched, spec, req.backend or "", sched.submitted)
    return {"id": job_id, "backend": sched.name, "image": ref, "digest": digest}
