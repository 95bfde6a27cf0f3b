"""Where replicas run: the allocation's nodes (Slurm) or this machine (local), and replicas spread over them."""

from __future__ import annotations

import contextlib
import ipaddress
import math
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
    container_name: str = ""    # `container_name:` (one replica): its name instead of SERVICE-N
    cpus: int = 0               # CPUs its step gets (0: the default, one)
    mem: int = 0                # bytes its step gets (0: the default)

    @property
    def name(self) -> str:
        return self.container_name or f"{self.service}-{self.index}"


@dataclass
class NodeInfo:
    """What placement knows of a node: the job's CPUs and memory there (0: unknown, not checked), Slurm
    features as labels, and whether it is the job's first node (Swarm's manager: the supervisor runs there)."""

    cpus: float = 0.0
    mem: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    manager: bool = False
    arch: str = ""
    os: str = "linux"


def _arch() -> str:
    import platform

    return platform.machine()


def labels_of(features: str) -> dict[str, str]:
    """Slurm features as Swarm node labels: `KEY=VALUE` or `KEY:VALUE`; a bare feature is `KEY=true`."""
    out: dict[str, str] = {}
    for f in filter(None, re.split(r"[,&|]", features)):
        if f in ("(null)", "(none)"):
            continue
        m = re.fullmatch(r"([^=:]+)[=:](.*)", f)
        out[(m.group(1) if m else f).strip()] = m.group(2).strip() if m else "true"
    return out


def _cpus_per_node(text: str) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def node_info(backend: str, nodes: list[str]) -> dict[str, NodeInfo]:
    if backend in HOSTFILES:                    # the slots the scheduler gave the job there; memory unknown
        slots = hostfile_cpus(backend)
        return {n: NodeInfo(float(slots.get(n, 0)), 0, {}, i == 0, _arch()) for i, n in enumerate(nodes)}
    if backend != "slurm":
        try:
            cpus = float(len(os.sched_getaffinity(0)))
        except OSError:
            cpus = float(os.cpu_count() or 1)
        mem = 0
        with contextlib.suppress(OSError, ValueError, IndexError, StopIteration), open("/proc/meminfo") as f:
            mem = int(next(x for x in f if x.startswith("MemTotal:")).split()[1]) * 1024
        return {n: NodeInfo(cpus, mem, {}, i == 0, _arch()) for i, n in enumerate(nodes)}
    recs = _node_records(nodes)
    per = _cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
    mem_env = os.environ.get("SLURM_MEM_PER_NODE", "")
    out = {}
    for i, n in enumerate(nodes):
        kv = recs.get(n, {})
        cpus = float(per[i]) if i < len(per) else float(kv.get("CPUTot", "0") or 0)
        mem = int(mem_env) << 20 if mem_env.isdigit() else int(kv.get("RealMemory", "0") or 0) << 20
        feats = kv.get("ActiveFeatures") or kv.get("AvailableFeatures") or ""
        out[n] = NodeInfo(cpus, mem, labels_of(feats), i == 0, kv.get("Arch", "") or _arch(),
                          (kv.get("OS", "") or "linux").split()[0].lower())
    return out


def satisfies(node: str, info: NodeInfo | None, constraints: list[tuple[str, str, str]]) -> str:
    """The first constraint `node` fails ("" when it meets them all); without info (checking a file before
    its job has nodes) none is checked."""
    if info is None:
        return ""
    for key, op, want in constraints:
        if key in ("node.hostname", "node.id"):
            have: str | None = node
        elif key == "node.role":
            have = "manager" if info.manager else "worker"
        elif key == "node.platform.os":
            have = info.os
        elif key == "node.platform.arch":
            have = info.arch
        else:
            have = info.labels.get(key.removeprefix("node.labels."))
        if (have == want) != (op == "=="):
            return f"{key} {op} {want}"
    return ""


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NODELIST"))


HOSTFILES = {"gridengine": "PE_HOSTFILE", "pbs": "PBS_NODEFILE"}


def batch_job() -> str:
    """"gridengine" / "pbs" inside a job of theirs that nagaya's wrapper started (NAGAYA_BATCH_JOB) and whose
    scheduler names its hosts in a file ($PE_HOSTFILE, $PBS_NODEFILE); "" elsewhere."""
    backend = os.environ.get("NAGAYA_BATCH_JOB", "").partition(" ")[0]
    return backend if backend in HOSTFILES and os.environ.get(HOSTFILES[backend]) else ""


def _hostfile_lines(backend: str) -> list[list[str]]:
    try:
        with open(os.environ[HOSTFILES[backend]]) as f:
            return [x.split() for x in f if x.strip()]
    except (OSError, KeyError):
        raise UsageError(f"compose on {backend}: cannot read ${HOSTFILES[backend]}, the job's host list") from None


def hostfile_cpus(backend: str) -> dict[str, int]:
    """Each host's slots: Grid Engine's `host slots queue range` lines; PBS's one line per slot."""
    out: dict[str, int] = {}
    for words in _hostfile_lines(backend):
        n = int(words[1]) if backend == "gridengine" and len(words) > 1 and words[1].isdigit() else 1
        out[words[0]] = out.get(words[0], 0) + n
    return out


def _outward(peers: list[str]) -> str | None:
    """This host's address as another host of the job reaches it (where its name resolves to loopback)."""
    import socket as _socket

    for p in peers:
        with contextlib.suppress(OSError), _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            s.connect((p, 9))                   # no packet: only the route's source address is chosen
            return str(s.getsockname()[0])
    return None


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
    if backend in HOSTFILES:
        return list(hostfile_cpus(backend))     # the job's first host first, as the scheduler lists them
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
    if backend in HOSTFILES:
        addrs = {n: _resolve(n) for n in nodes}
        if len(nodes) > 1:                      # this host's name may map to loopback: its outward address
            remote = [a for a in addrs.values() if not a.startswith("127.")]
            out = _outward(remote)
            addrs = {n: (out or a) if a.startswith("127.") else a for n, a in addrs.items()}
        return addrs
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


def place(project: Project, nodes: list[str], gpus: dict[str, list[int]] | None = None,
          info: dict[str, NodeInfo] | None = None) -> list[Replica]:
    """Spread each service's replicas over its nodes (least loaded first), refusing two replicas that need
    one port on one node (under host networking they would fight over it) and, given each node's GPU
    indices, handing every replica its GPUs, never one GPU to two replicas. Placement constraints, `global`
    mode, max_replicas_per_node and, given `info`, CPU and memory reservations decide which nodes may take
    a replica. gpus=None / info=None: GPUs / CPUs and memory are not checked (validation before the job has
    nodes)."""
    load = {n: 0 for n in nodes}
    taken: dict[tuple[str, int, str], str] = {}      # (node, port, proto) -> replica name
    free_gpus = {n: list((gpus or {}).get(n, [])) for n in nodes}
    free_cpu = {n: info[n].cpus if info else 0.0 for n in nodes}
    free_mem = {n: info[n].mem if info else 0 for n in nodes}
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
        cons = svc.deploy.placement.parsed()
        if cons:
            why = {n: satisfies(n, (info or {}).get(n), cons) for n in cands}
            cands = [n for n in cands if not why[n]]
            if not cands and (svc.replicas or svc.is_global):
                raise UsageError(f"cannot place {name}: no node of the job meets its placement constraints ("
                                 + "; ".join(f"{n}: not {w}" for n, w in why.items()) + ")")
        ports = [(p.host_port, p.protocol) for p in svc.ports]
        count, ids = svc.gpu_request
        per_node = svc.deploy.placement.max_replicas_per_node
        mine_here: dict[str, int] = {}
        cpu, mem = svc.cpu_need, svc.mem_need
        replicas = len(cands) if svc.is_global else svc.replicas
        for i in range(1, replicas + 1):
            rname = svc.container_name or f"{name}-{i}"
            order = [cands[i - 1]] if svc.is_global else cands
            free = [n for n in order if not any((n, port, proto) in taken for port, proto in ports)]
            if not free:
                port, proto = ports[0]
                holder = next(taken[(n, p, q)] for n in order for p, q in ports if (n, p, q) in taken)
                raise UsageError(
                    f"cannot place {rname}: port {port}/{proto} is already used on every node it may run on "
                    f"(e.g. by {holder}); under host networking two replicas cannot share a port on one node: "
                    f"use fewer replicas, more nodes, or different ports")
            if per_node:
                free = [n for n in free if mine_here.get(n, 0) < per_node]
                if not free:
                    raise UsageError(f"cannot place {rname}: every node it may run on has "
                                     f"max_replicas_per_node={per_node} replicas of {name} already")
            if info:
                fit = [n for n in free if (not cpu or not info[n].cpus or free_cpu[n] >= cpu - 1e-9)
                       and (not mem or not info[n].mem or free_mem[n] >= mem)]
                if not fit:
                    left = ", ".join(f"{n}: {free_cpu[n]:g} CPUs, {free_mem[n] >> 20} MiB" for n in free)
                    raise UsageError(f"cannot place {rname}: it reserves {cpu:g} CPUs and {mem >> 20} MiB and no "
                                     f"node it may run on has that much left ({left}); use fewer replicas or "
                                     f"smaller reservations, or more nodes")
                free = fit
            if gpus is not None:
                if ids is not None:
                    fits = [n for n in free if all(g in free_gpus[n] for g in ids)]
                else:
                    fits = [n for n in free if free_gpus[n] and len(free_gpus[n]) == len(gpus.get(n, []))] \
                        if count == "all" else [n for n in free if len(free_gpus[n]) >= int(count)]
                if not fits:
                    need = f"GPUs {','.join(map(str, ids))}" if ids is not None else \
                        "every GPU of its node" if count == "all" else f"{count} GPU(s)"
                    left = ", ".join(f"{n}: {len(free_gpus[n])} of {len(gpus.get(n, []))}" for n in free)
                    raise UsageError(f"cannot place {rname}: it needs {need} and no node it may run on has that "
                                     f"many free ({left}); use fewer replicas or GPUs, or more nodes")
                free = fits
            node = min(free, key=lambda n: (load[n], order.index(n)))
            load[node] += 1
            mine_here[node] = mine_here.get(node, 0) + 1
            for port, proto in ports:
                taken[(node, port, proto)] = rname
            if gpus is None:
                got: list[int] = []
            elif ids is not None:
                got = list(ids)
                free_gpus[node] = [g for g in free_gpus[node] if g not in ids]
            else:
                n_ = len(free_gpus[node]) if count == "all" else int(count)
                got, free_gpus[node] = free_gpus[node][:n_], free_gpus[node][n_:]
            free_cpu[node] -= cpu
            free_mem[node] -= mem
            out.append(Replica(name, i, node, [p for p, _ in ports], got, svc.container_name or "",
                               math.ceil(svc.cpu_limit) if svc.cpu_limit else 0, svc.mem_limit_bytes))
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
        svc = project.services[name]
        for alias in (svc.container_name, svc.hostname):     # other services reach it by these names too
            if alias and alias != name:
                lines.append(f"{addrs[mine[0].node]}\t{alias}")
    return "\n".join(lines) + "\n"


def service_env(project: Project, replicas: list[Replica], addrs: dict[str, str]) -> dict[str, str]:
    """NAGAYA_SERVICE_<NAME>_HOSTS: the addresses of every replica of a service, comma-separated."""
    out: dict[str, str] = {}
    for name in project.services:
        key = "NAGAYA_SERVICE_" + "".join(c if c.isalnum() else "_" for c in name.upper()) + "_HOSTS"
        out[key] = ",".join(addrs[r.node] for r in replicas if r.service == name)
    return out
