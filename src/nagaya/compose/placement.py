"""Where replicas run: the allocation's nodes (Slurm) or this machine (local), and replicas spread over them."""

from __future__ import annotations

import ipaddress
import os
import re
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
    gpus: list[int] = field(default_factory=list)      # the node's GPU indices this replica owns

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


def _node_records(nodes: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for line in _scontrol("show", "node", "-o", ",".join(nodes)).splitlines():
        kv = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
        if kv.get("NodeName") in nodes:
            out[kv["NodeName"]] = kv
    return out


def _resolve(name: str) -> str:
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        raise UsageError(f"cannot resolve node {name}: containers could not reach the services on it") from None


def node_addrs(backend: str, nodes: list[str]) -> dict[str, str]:
    """Each node's IP address as containers on other nodes dial it: Slurm's NodeAddr (the address slurmctld
    itself uses; it differs from the name where node names are not in DNS, e.g. the netns test cluster),
    resolved when it is a name; local: loopback. A hosts file needs addresses, never names."""
    if backend != "slurm":
        return {n: "127.0.0.1" for n in nodes}
    recs = _node_records(nodes)
    return {n: _resolve(recs.get(n, {}).get("NodeAddr") or n) for n in nodes}


def _indices(text: str) -> list[int]:
    """`0,2-3` -> [0, 2, 3]."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def job_gpus() -> dict[str, list[int]]:
    """The GPU indices Slurm gave this job on each of its nodes (GRES); empty: a job without GPUs."""
    out: dict[str, list[int]] = {}
    for nodelist, idx in job_gpu_indices(_scontrol("-d", "show", "job", os.environ["SLURM_JOB_ID"])):
        for n in _scontrol("show", "hostnames", nodelist).split():
            out[n] = idx
    return out


def gpu_pools(backend: str, nodes: list[str], dev_dir: str, gres: dict[str, list[int]]) -> dict[str, list[int]]:
    """The GPU indices each node offers the stack.

    Slurm job with GPUs (GRES, from job_gpus()): the indices Slurm gave the job on each node; every step on a
    node is given all of them and compose hands them out, disjoint, to the replicas. Nodes without GPU GRES
    configured (GPUs Slurm does not manage): the device nodes present, as on this node. Local: the job's
    SLURM_JOB_GPUS or CUDA_VISIBLE_DEVICES when set (already narrowed for us), else every /dev/nvidiaN."""
    present = sorted(int(m.group(1)) for n in _listdir(dev_dir) if (m := re.fullmatch(r"nvidia(\d+)", n)))
    if backend != "slurm":
        for var in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
            val = os.environ.get(var, "")
            if re.fullmatch(r"\d+(,\d+)*", val):
                return {n: [i for i in _indices(val) if i in present] for n in nodes}
        return {n: present for n in nodes}
    if gres:
        return {n: gres.get(n, []) for n in nodes}
    managed = [n for n, kv in _node_records(nodes).items() if "gpu" in kv.get("Gres", "")]
    if managed:
        raise UsageError(f"x-nagaya.gpus: this job has no GPUs on {', '.join(managed)} "
                         f"(submit with --gpus or --gres=gpu:N)")
    return {n: present for n in nodes}


def job_gpu_indices(detail: str) -> list[tuple[str, list[int]]]:
    """From `scontrol -d show job`: (node list, GPU indices) per `Nodes=n[1-2] ... GRES=gpu:2(IDX:0-1)` line."""
    pat = r"^\s*Nodes=(\S+) .*?GRES=\S*?gpu(?::[^:(,\s]+)?:\d+\(IDX:([\d,-]+)\)"
    return [(m.group(1), _indices(m.group(2))) for m in re.finditer(pat, detail, re.M)]


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


def place(project: Project, nodes: list[str], gpus: dict[str, list[int]] | None = None) -> list[Replica]:
    """Spread each service's replicas over its nodes (least loaded first), refusing two replicas that need
    one port on one node (under host networking they would fight over it) and, given each node's GPU
    indices, handing every replica `x-nagaya.gpus` of them, never one GPU to two replicas.
    gpus=None: GPUs are not checked (validation before the job has nodes)."""
    load = {n: 0 for n in nodes}
    taken: dict[tuple[str, int, str], str] = {}      # (node, port, proto) -> replica name
    free_gpus = {n: list((gpus or {}).get(n, [])) for n in nodes}
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
        need = svc.x_nagaya.gpus if gpus is not None else 0
        for i in range(1, svc.replicas + 1):
            free = [n for n in cands if not any((n, port, proto) in taken for port, proto in ports)]
            if not free:
                port, proto = ports[0]
                holder = next(taken[(n, p, q)] for n in cands for p, q in ports if (n, p, q) in taken)
                raise UsageError(
                    f"cannot place {name}-{i}: port {port}/{proto} is already used on every node it may run on "
                    f"(e.g. by {holder}); under host networking two replicas cannot share a port on one node: "
                    f"use fewer replicas, more nodes, or different ports")
            fits = [n for n in free if len(free_gpus[n]) >= need]
            if not fits:
                left = ", ".join(f"{n}: {len(free_gpus[n])} of {len((gpus or {}).get(n, []))}" for n in free)
                raise UsageError(f"cannot place {name}-{i}: it needs {need} GPU(s) and no node it may run on has "
                                 f"that many free ({left}); use fewer replicas or GPUs, or more nodes")
            node = min(fits, key=lambda n: (load[n], cands.index(n)))
            load[node] += 1
            for port, proto in ports:
                taken[(node, port, proto)] = f"{name}-{i}"
            mine, free_gpus[node] = free_gpus[node][:need], free_gpus[node][need:]
            out.append(Replica(name, i, node, [p for p, _ in ports], mine))
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
