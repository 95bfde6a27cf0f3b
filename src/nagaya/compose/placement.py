"""Where replicas run: the allocation's nodes (Slurm) or this machine (local), and replicas spread over them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from nagaya.compose.spec import Project
from nagaya.errors import UsageError


@dataclass
class Replica:
    service: str
    index: int                  # 1-based, as compose names replicas
    node: str
    ports: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NODELIST"))


def _scontrol(*args: str) -> str:
    exe = shutil.which("scontrol")
    if not exe:
        raise UsageError("scontrol not found: compose inside a Slurm job needs the Slurm client tools")
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise UsageError(f"scontrol {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def job_nodes(backend: str) -> list[str]:
    if backend == "slurm":
        return _scontrol("show", "hostnames", os.environ["SLURM_JOB_NODELIST"]).split()
    return [socket.gethostname()]


def node_addrs(backend: str, nodes: list[str]) -> dict[str, str]:
    """Each node's address as containers should dial it. Slurm's NodeAddr, so a cluster whose node names
    are not in DNS still works (the test cluster: n1..n3 all on 127.0.0.1); local: loopback."""
    if backend != "slurm":
        return {n: "127.0.0.1" for n in nodes}
    out: dict[str, str] = {}
    for line in _scontrol("show", "node", "-o", ",".join(nodes)).splitlines():
        kv = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
        if kv.get("NodeName") in nodes:
            out[kv["NodeName"]] = kv.get("NodeAddr") or kv["NodeName"]
    for n in nodes:
        if n not in out:
            try:
                out[n] = socket.gethostbyname(n)
            except OSError:
                out[n] = n
    return out


def place(project: Project, nodes: list[str]) -> list[Replica]:
    """Spread each service's replicas over its nodes (least loaded first), refusing two replicas that need
    one port on one node: under host networking they would fight over it."""
    load = {n: 0 for n in nodes}
    taken: dict[tuple[str, int, str], str] = {}      # (node, port, proto) -> replica name
    out: list[Replica] = []
    for name in project.order():
        svc = project.services[name]
        want = svc.x_nagaya.nodes
        if isinstance(want, list):
            unknown = [n for n in want if n not in nodes]
            if unknown:
                raise UsageError(f"services.{name}.x-nagaya.nodes: {', '.join(unknown)} not in this job "
                                 f"({', '.join(nodes)})")
            cands = list(want)
        elif isinstance(want, int):
            if want > len(nodes):
                raise UsageError(f"services.{name}.x-nagaya.nodes: {want} nodes wanted, the job has {len(nodes)}")
            cands = sorted(nodes, key=lambda n: load[n])[:want]
        else:
            cands = list(nodes)
        ports = [(p.host_port, p.protocol) for p in svc.ports]
        for i in range(1, svc.replicas + 1):
            free = [n for n in cands if not any((n, port, proto) in taken for port, proto in ports)]
            if not free:
                port, proto = ports[0]
                holder = next(taken[(n, p, q)] for n in cands for p, q in ports if (n, p, q) in taken)
                raise UsageError(
                    f"cannot place {name}-{i}: port {port}/{proto} is already used on every node it may run on "
                    f"(e.g. by {holder}); under host networking two replicas cannot share a port on one node: "
                    f"use fewer replicas, more nodes, or different ports")
            node = min(free, key=lambda n: (load[n], cands.index(n)))
            load[node] += 1
            for port, proto in ports:
                taken[(node, port, proto)] = f"{name}-{i}"
            out.append(Replica(name, i, node, [p for p, _ in ports]))
    return out


def hosts_file(project: Project, replicas: list[Replica], addrs: dict[str, str]) -> str:
    """`SERVICE` -> the address of a node running it; `tasks.SERVICE` -> every one of them (one line each)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for n, a in addrs.items():
        lines.append(f"{a}\t{n}")
    for name in project.services:
        mine = [r for r in replicas if r.service == name]
        if not mine:
            continue
        lines.append(f"{addrs[mine[0].node]}\t{name}")
        for r in mine:
            lines.append(f"{addrs[r.node]}\ttasks.{name}")
    return "\n".join(lines) + "\n"


def service_env(project: Project, replicas: list[Replica], addrs: dict[str, str]) -> dict[str, str]:
    """NAGAYA_SERVICE_<NAME>_HOSTS: the addresses of every replica of a service, comma-separated."""
    out: dict[str, str] = {}
    for name in project.services:
        key = "NAGAYA_SERVICE_" + "".join(c if c.isalnum() else "_" for c in name.upper()) + "_HOSTS"
        out[key] = ",".join(addrs[r.node] for r in replicas if r.service == name)
    return out
