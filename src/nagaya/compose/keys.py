"""Every key of the Compose Specification (and of Swarm's `deploy` section), with nagaya's answer to it.

One table drives the check of a compose file (`check`), the typed models in spec.py (which see only the
keys answered *honoured*) and the README's key table (`python -m nagaya.compose.keys`):

- honoured: the key means what the text says under nagaya;
- ignored: accepted, with one line on stderr giving the reason (`compose.yml: services.web.networks: ignored: ...`);
- refused: the file is refused, naming the key's path and the reason.

A key under an ignored or refused one shares its answer (the one line or the error is the parent's); it is
still checked, so a typo anywhere is an error. A key in no spec is an error naming its path, with the
closest known key as a hint. `x-*` extension keys are accepted wherever the spec accepts them.

The paths follow compose-spec.json (compose-spec/compose-spec, 2025): `*` is a name the file chooses (a
service, a network...), `[]` an item of a list, `{}` a free-form mapping whose keys are not checked.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

H, IG, R = "honoured", "ignored", "refused"

HOSTNET = "host networking inside a job: replicas use their node's network, and services find each other by name " \
          "through /etc/hosts"
NO_CGROUP = "no cgroup of the container's own (unprivileged, inside a job): the job's limits apply"
META = "metadata for Docker's objects; nagaya keeps none"
NO_UPDATES = "a stack starts once per job: there are no rolling updates or rollbacks"
HOOKS = "lifecycle hooks are not supported: run the command in the service's command or entrypoint"
WINDOWS = "Windows containers only"
NOPRIV = "containers run with your own rights: nothing privileged can be granted"

# path -> (answer, meaning under nagaya, or why ignored / refused)
KEYS: dict[str, tuple[str, str]] = {
    "version": (IG, "obsolete in the Compose Specification; the file is read by the current spec"),
    "name": (H, "the project's name (default: the file's directory)"),
    "include": (R, "including other compose files is not supported: merge them into one file"),
    "include[].path": (R, ""), "include[].env_file": (R, ""), "include[].project_directory": (R, ""),
    "services": (H, "the services, started in depends_on order"),
    "models": (R, "models need Docker Model Runner"),
    "models.*": (R, ""), "models.*.name": (R, ""), "models.*.model": (R, ""), "models.*.context_size": (R, ""),
    "models.*.runtime_flags": (R, ""),
    "networks": (IG, HOSTNET),
    "networks.*": (IG, ""), "networks.*.name": (IG, ""), "networks.*.driver": (IG, ""),
    "networks.*.driver_opts": (IG, ""), "networks.*.driver_opts.{}": (IG, ""), "networks.*.ipam": (IG, ""),
    "networks.*.ipam.driver": (IG, ""), "networks.*.ipam.config": (IG, ""), "networks.*.ipam.config[].subnet": (IG, ""),
    "networks.*.ipam.config[].ip_range": (IG, ""), "networks.*.ipam.config[].gateway": (IG, ""),
    "networks.*.ipam.config[].aux_addresses": (IG, ""), "networks.*.ipam.config[].aux_addresses.{}": (IG, ""),
    "networks.*.ipam.options": (IG, ""), "networks.*.ipam.options.{}": (IG, ""),
    "networks.*.external": (IG, ""), "networks.*.external.name": (IG, ""), "networks.*.internal": (IG, ""),
    "networks.*.enable_ipv4": (IG, ""), "networks.*.enable_ipv6": (IG, ""), "networks.*.attachable": (IG, ""),
    "networks.*.labels": (IG, ""), "networks.*.labels.{}": (IG, ""),
    "volumes": (H, "named volumes: directories of yours under ~/.local/share/nagaya/compose/volumes/PROJECT_NAME, "
                   "kept from one `up` (and job) to the next, on the shared file system every node sees"),
    "volumes.*": (H, "a named volume"),
    "volumes.*.name": (H, "the volume directory's name (default PROJECT_NAME)"),
    "volumes.*.driver": (H, "`local` only; any other driver is refused"),
    "volumes.*.driver_opts": (R, "volume driver options are not supported: use a bind mount of the directory"),
    "volumes.*.driver_opts.{}": (R, ""),
    "volumes.*.external": (R, "external volumes live in a Docker engine: use a bind mount of a directory"),
    "volumes.*.external.name": (R, ""),
    "volumes.*.labels": (IG, META), "volumes.*.labels.{}": (IG, ""),
    "secrets": (H, "secrets from a file of yours (`file`) or a variable (`environment`), mounted read-only"),
    "secrets.*": (H, "one secret"),
    "secrets.*.name": (IG, "the secret's name in a Swarm store; nagaya mounts the file by its key"),
    "secrets.*.file": (H, "a file you can read, bind-mounted read-only"),
    "secrets.*.environment": (H, "the variable's value, written to a file only you can read (mode 0600)"),
    "secrets.*.external": (R, "external secrets live in a Swarm store: give `file:` instead"),
    "secrets.*.external.name": (R, ""),
    "secrets.*.labels": (IG, META), "secrets.*.labels.{}": (IG, ""),
    "secrets.*.driver": (R, "secret drivers need Swarm: give `file:` instead"),
    "secrets.*.driver_opts": (R, "secret drivers need Swarm: give `file:` instead"),
    "secrets.*.driver_opts.{}": (R, ""),
    "secrets.*.template_driver": (R, "templated secrets need Swarm"),
    "configs": (H, "configs from a file of yours (`file`), inline `content` or a variable, mounted read-only"),
    "configs.*": (H, "one config"),
    "configs.*.name": (IG, "the config's name in a Swarm store; nagaya mounts the file by its key"),
    "configs.*.file": (H, "a file you can read, bind-mounted read-only"),
    "configs.*.content": (H, "written to a file of yours, mounted read-only"),
    "configs.*.environment": (H, "the variable's value, written to a file of yours, mounted read-only"),
    "configs.*.external": (R, "external configs live in a Swarm store: give `file:` instead"),
    "configs.*.external.name": (R, ""),
    "configs.*.labels": (IG, META), "configs.*.labels.{}": (IG, ""),
    "configs.*.template_driver": (R, "templated configs need Swarm"),

    "services.*": (H, "a service: its replicas run with `nagaya run`, as you"),
    "services.*.develop": (IG, "`compose watch` is for development on a workstation"),
    "services.*.develop.watch": (IG, ""), "services.*.develop.watch[].ignore": (IG, ""),
    "services.*.develop.watch[].include": (IG, ""), "services.*.develop.watch[].path": (IG, ""),
    "services.*.develop.watch[].action": (IG, ""), "services.*.develop.watch[].target": (IG, ""),
    "services.*.develop.watch[].exec": (IG, ""), "services.*.develop.watch[].exec.command": (IG, ""),
    "services.*.develop.watch[].exec.user": (IG, ""), "services.*.develop.watch[].exec.privileged": (IG, ""),
    "services.*.develop.watch[].exec.working_dir": (IG, ""), "services.*.develop.watch[].exec.environment": (IG, ""),
    "services.*.develop.watch[].exec.environment.{}": (IG, ""), "services.*.develop.watch[].initial_sync": (IG, ""),
    "services.*.deploy": (H, "Swarm's deploy section, as below"),
    "services.*.deploy.mode": (H, "`replicated` (deploy.replicas of them), `global` (one replica on every node of "
                                  "the job); `replicated-job` / `global-job` the same, run to completion"),
    "services.*.deploy.endpoint_mode": (IG, "no virtual IPs: SERVICE resolves to a node running it and "
                                           "tasks.SERVICE to all of them, as with dnsrr"),
    "services.*.deploy.replicas": (H, "how many replicas, spread over the job's nodes, least loaded first"),
    "services.*.deploy.labels": (IG, META), "services.*.deploy.labels.{}": (IG, ""),
    "services.*.deploy.rollback_config": (IG, NO_UPDATES),
    "services.*.deploy.update_config": (IG, NO_UPDATES),
    **{f"services.*.deploy.{s}.{k}": (IG, "") for s in ("rollback_config", "update_config")
       for k in ("parallelism", "delay", "failure_action", "monitor", "max_failure_ratio", "order")},
    "services.*.deploy.resources": (H, "CPUs, memory and GPUs, as below"),
    "services.*.deploy.resources.limits": (H, "the most a replica may use"),
    "services.*.deploy.resources.limits.cpus": (
        H, "CPUs for the replica: its Slurm step gets that many (rounded up, srun --cpus-per-task); a local "
           "replica is pinned to that many CPUs of the machine"),
    "services.*.deploy.resources.limits.memory": (
        H, "its Slurm step's memory (srun --mem; enforced where Slurm confines steps); placement checks it "
           "fits the node (locally: the machine's memory)"),
    "services.*.deploy.resources.limits.pids": (IG, NO_CGROUP),
    "services.*.deploy.resources.reservations": (H, "what a replica needs: placement puts it only on a node with "
                                                    "that much left"),
    "services.*.deploy.resources.reservations.cpus": (H, "CPUs the replica needs: nodes are filled up to the job's "
                                                         "CPUs there (locally: the machine's); the step gets them"),
    "services.*.deploy.resources.reservations.memory": (H, "memory the replica needs, counted the same way"),
    "services.*.deploy.resources.reservations.generic_resources": (
        H, "Swarm's discrete resources: a kind naming GPUs (`gpu`, `NVIDIA-GPU`...) gives `value` GPUs per replica; "
           "other kinds are refused"),
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec": (H, ""),
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec.kind": (H, ""),
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec.value": (H, ""),
    "services.*.deploy.resources.reservations.devices": (
        H, "GPU reservations (`capabilities: [gpu]`): `count` GPUs per replica (`all`: every GPU of the node) or "
           "the `device_ids` named, never one GPU to two replicas; other capabilities are refused"),
    "services.*.deploy.resources.reservations.devices[].capabilities": (H, "must include `gpu`"),
    "services.*.deploy.resources.reservations.devices[].count": (H, "GPUs per replica, or `all`"),
    "services.*.deploy.resources.reservations.devices[].device_ids": (H, "these GPUs of the node (host indices)"),
    "services.*.deploy.resources.reservations.devices[].driver": (H, "`nvidia` (or absent)"),
    "services.*.deploy.resources.reservations.devices[].options": (IG, "driver options for Docker's device plugins"),
    "services.*.deploy.resources.reservations.devices[].options.{}": (IG, ""),
    "services.*.deploy.restart_policy": (H, "restart exited replicas with back-off, as below (overrides `restart`)"),
    "services.*.deploy.restart_policy.condition": (H, "`none`, `on-failure` (exit status not 0) or `any` "
                                                      "(the default)"),
    "services.*.deploy.restart_policy.delay": (H, "the first restart's delay (default 5s), doubled for every "
                                                  "restart in a row, at most 1 min"),
    "services.*.deploy.restart_policy.max_attempts": (H, "restarts before nagaya gives up (default: no limit); "
                                                         "then the replica's failure fails the stack"),
    "services.*.deploy.restart_policy.window": (H, "a replica that ran this long before exiting starts a fresh "
                                                   "count of attempts (and delay)"),
    "services.*.deploy.placement": (H, "where replicas may run, as below"),
    "services.*.deploy.placement.constraints": (
        H, "`node.hostname`, `node.id` (the job's node names), `node.role` (`manager`: the job's first node, where "
           "the stack's supervisor runs; `worker`: the others), `node.labels.KEY` (Slurm node features: `KEY=VALUE` "
           "or `KEY:VALUE`, a bare feature is `KEY == true`), `node.platform.os`, `node.platform.arch`; "
           "`==` and `!=`"),
    "services.*.deploy.placement.preferences": (IG, "replicas are already spread evenly over the job's nodes"),
    "services.*.deploy.placement.preferences[].spread": (IG, ""),
    "services.*.deploy.placement.max_replicas_per_node": (H, "at most this many replicas of the service per node"),
    "services.*.annotations": (IG, META), "services.*.annotations.{}": (IG, ""),
    "services.*.attach": (IG, "every replica's output goes to its log (`nagaya compose logs`)"),
    "services.*.build": (H, "built with `nagaya build -t IMAGE` before `up` when the image is missing (always with "
                            "`up --build` or `pull_policy: build`); IMAGE is `image:` or PROJECT-SERVICE"),
    "services.*.build.context": (H, "the build context (default `.`, relative to the compose file)"),
    "services.*.build.dockerfile": (H, "the Dockerfile, relative to the context"),
    "services.*.build.dockerfile_inline": (H, "the Dockerfile's text"),
    "services.*.build.entitlements": (R, NOPRIV),
    "services.*.build.args": (H, "`--build-arg K=V`"), "services.*.build.args.{}": (H, ""),
    "services.*.build.ssh": (R, "SSH agent forwarding into builds is not supported"),
    "services.*.build.ssh.{}": (R, ""),
    "services.*.build.labels": (IG, "labels are not added to nagaya-built images"),
    "services.*.build.labels.{}": (IG, ""),
    "services.*.build.cache_from": (IG, "builds use buildah's own layer cache"),
    "services.*.build.cache_to": (IG, "builds use buildah's own layer cache"),
    "services.*.build.no_cache": (H, "`--no-cache`"),
    "services.*.build.additional_contexts": (R, "additional build contexts are not supported by nagaya build"),
    "services.*.build.additional_contexts.{}": (R, ""),
    "services.*.build.network": (IG, "builds use the host's network"),
    "services.*.build.provenance": (IG, "no provenance attestations are made"),
    "services.*.build.sbom": (IG, "no SBOM attestation is made at build time"),
    "services.*.build.pull": (IG, "the base image comes from your images or the site registry"),
    "services.*.build.target": (R, "building a multi-stage target is not supported by nagaya build"),
    "services.*.build.shm_size": (IG, "builds use the host's /dev/shm"),
    "services.*.build.extra_hosts": (IG, "builds use the host's /etc/hosts"),
    "services.*.build.extra_hosts.{}": (IG, ""),
    "services.*.build.isolation": (IG, WINDOWS),
    "services.*.build.privileged": (R, NOPRIV),
    "services.*.build.secrets": (R, "build secrets are not supported by nagaya build"),
    **{f"services.*.build.secrets[].{k}": (R, "") for k in ("source", "target", "uid", "gid", "mode")},
    "services.*.build.tags": (IG, "only the service's image name is tagged"),
    "services.*.build.ulimits": (IG, "builds run with your limits"), "services.*.build.ulimits.*": (IG, ""),
    "services.*.build.ulimits.*.hard": (IG, ""), "services.*.build.ulimits.*.soft": (IG, ""),
    "services.*.build.platforms": (IG, "images are built for this machine's platform"),
    "services.*.blkio_config": (IG, NO_CGROUP),
    **{f"services.*.blkio_config.{k}": (IG, "") for k in ("device_read_bps", "device_read_iops", "device_write_bps",
                                                          "device_write_iops", "weight", "weight_device")},
    **{f"services.*.blkio_config.{k}[].{f}": (IG, "") for k in ("device_read_bps", "device_read_iops",
                                                                "device_write_bps", "device_write_iops")
       for f in ("path", "rate")},
    "services.*.blkio_config.weight_device[].path": (IG, ""),
    "services.*.blkio_config.weight_device[].weight": (IG, ""),
    "services.*.cap_add": (IG, "containers get no capabilities beyond your own"),
    "services.*.cap_drop": (IG, "containers have no capabilities beyond your own to drop"),
    "services.*.cgroup": (IG, NO_CGROUP),
    "services.*.cgroup_parent": (IG, NO_CGROUP),
    "services.*.command": (H, "the command (a list, or a string split as a shell would)"),
    "services.*.configs": (H, "configs mounted read-only: at /SOURCE, or `target`"),
    "services.*.configs[].source": (H, "a config of the file's top-level `configs`"),
    "services.*.configs[].target": (H, "where it appears (a relative path is under /)"),
    "services.*.configs[].uid": (IG, "the file keeps its owner: you"),
    "services.*.configs[].gid": (IG, "the file keeps its group: yours"),
    "services.*.configs[].mode": (IG, "the file keeps its own mode (mounted read-only)"),
    "services.*.container_name": (H, "the replica's name (ps, logs) and a name it is reachable by; one replica only"),
    **{f"services.*.{k}": (IG, NO_CGROUP) for k in ("cpu_count", "cpu_percent", "cpu_shares", "cpu_quota",
                                                   "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpuset",
                                                   "mem_swappiness", "memswap_limit", "oom_kill_disable",
                                                   "oom_score_adj", "pids_limit", "device_cgroup_rules",
                                                   "storage_opt")},
    "services.*.cpus": (H, "as deploy.resources.limits.cpus"),
    "services.*.credential_spec": (IG, WINDOWS),
    "services.*.credential_spec.config": (IG, ""), "services.*.credential_spec.file": (IG, ""),
    "services.*.credential_spec.registry": (IG, ""),
    "services.*.depends_on": (H, "start order and conditions"),
    "services.*.depends_on.*": (H, "one dependency"),
    "services.*.depends_on.*.restart": (IG, "a dependency's restart does not restart the services that need it"),
    "services.*.depends_on.*.required": (H, "`false`: a dependency that is not in the stack (e.g. its profile is "
                                            "not enabled) is skipped"),
    "services.*.depends_on.*.condition": (H, "`service_started`, `service_healthy`, "
                                             "`service_completed_successfully`"),
    "services.*.devices": (R, "devices other than GPUs are not passed into containers (GPUs: "
                              "deploy.resources.reservations.devices or `gpus`)"),
    "services.*.devices[].source": (R, ""), "services.*.devices[].target": (R, ""),
    "services.*.devices[].permissions": (R, ""),
    "services.*.dns": (IG, "the host's resolver configuration (/etc/resolv.conf) is used"),
    "services.*.dns_opt": (IG, "the host's resolver configuration (/etc/resolv.conf) is used"),
    "services.*.dns_search": (IG, "the host's resolver configuration (/etc/resolv.conf) is used"),
    "services.*.domainname": (IG, "the NIS domain name is left as the node's"),
    "services.*.entrypoint": (H, "replaces the image's entrypoint"),
    "services.*.env_file": (H, "files of K=V lines, in order; `required: false` skips a missing one"),
    "services.*.env_file[].path": (H, ""), "services.*.env_file[].required": (H, ""),
    "services.*.env_file[].format": (H, "`raw` only: values taken as written"),
    "services.*.label_file": (IG, META),
    "services.*.environment": (H, "variables inside (a mapping, or a list of K=V; a bare K takes the host's value)"),
    "services.*.environment.{}": (H, ""),
    "services.*.expose": (IG, "informational under host networking: a replica's ports are open on its node"),
    "services.*.extends": (R, "extends is not supported: write the service out in full"),
    "services.*.extends.service": (R, ""), "services.*.extends.file": (R, ""),
    "services.*.provider": (R, "provider services need Docker Compose plugins"),
    "services.*.provider.type": (R, ""),
    "services.*.provider.options": (R, ""), "services.*.provider.options.{}": (R, ""),
    "services.*.external_links": (IG, HOSTNET),
    "services.*.extra_hosts": (H, "extra /etc/hosts lines in the replica (`host-gateway`: the node itself)"),
    "services.*.extra_hosts.{}": (H, ""),
    "services.*.gpus": (H, "GPUs per replica: `all`, or entries like deploy.resources.reservations.devices"),
    "services.*.gpus[].capabilities": (H, ""), "services.*.gpus[].count": (H, ""),
    "services.*.gpus[].device_ids": (H, ""), "services.*.gpus[].driver": (H, ""),
    "services.*.gpus[].options": (IG, "driver options for Docker's device plugins"),
    "services.*.gpus[].options.{}": (IG, ""),
    "services.*.group_add": (IG, "your own groups stay yours; no other group can be added"),
    "services.*.healthcheck": (H, "Docker's semantics; checks run with `nagaya exec` on the replica's node"),
    **{f"services.*.healthcheck.{k}": (H, "") for k in ("disable", "interval", "retries", "test", "timeout",
                                                        "start_period", "start_interval")},
    "services.*.hostname": (H, "the replica's hostname (a UTS namespace of its own: `hostname` prints it); "
                               "other services reach it by that name too"),
    "services.*.image": (H, "the image, pinned to its digest for every replica"),
    "services.*.init": (IG, "nagaya's pid 1 already reaps children and forwards signals"),
    "services.*.ipc": (IG, "containers share the node's IPC namespace"),
    "services.*.isolation": (IG, WINDOWS),
    "services.*.labels": (IG, META), "services.*.labels.{}": (IG, ""),
    "services.*.links": (IG, "every service is reachable by its name already (/etc/hosts)"),
    "services.*.logging": (IG, "each replica's output goes to its log file (`nagaya compose logs`)"),
    "services.*.logging.driver": (IG, ""),
    "services.*.logging.options": (IG, ""), "services.*.logging.options.{}": (IG, ""),
    "services.*.mac_address": (IG, HOSTNET),
    "services.*.mem_limit": (H, "as deploy.resources.limits.memory"),
    "services.*.mem_reservation": (H, "as deploy.resources.reservations.memory"),
    "services.*.network_mode": (IG, HOSTNET),
    "services.*.models": (R, "models need Docker Model Runner"),
    "services.*.models.*": (R, ""), "services.*.models.*.endpoint_var": (R, ""),
    "services.*.models.*.model_var": (R, ""),
    "services.*.networks": (IG, HOSTNET),
    "services.*.networks.*": (IG, ""),
    **{f"services.*.networks.*.{k}": (IG, "") for k in ("aliases", "interface_name", "ipv4_address", "ipv6_address",
                                                       "link_local_ips", "mac_address", "driver_opts", "priority",
                                                       "gw_priority")},
    "services.*.networks.*.driver_opts.{}": (IG, ""),
    "services.*.pid": (IG, "containers have a pid namespace of their own"),
    "services.*.platform": (IG, "images run on this machine's platform"),
    "services.*.ports": (H, "the ports a replica listens on, on its node (host networking): placement never puts "
                            "two replicas needing one port on one node"),
    "services.*.ports[].name": (IG, "informational"),
    "services.*.ports[].mode": (IG, "no routing mesh: a port is open on the nodes that run a replica"),
    "services.*.ports[].host_ip": (IG, "under host networking the app chooses the address it binds"),
    "services.*.ports[].target": (H, "the port the app listens on"),
    "services.*.ports[].published": (H, "the port clients dial; under host networking the app must listen on it "
                                        "(placement reserves it)"),
    "services.*.ports[].protocol": (H, "tcp or udp"),
    "services.*.ports[].app_protocol": (IG, "informational"),
    "services.*.post_start": (R, HOOKS), "services.*.pre_stop": (R, HOOKS),
    **{f"services.*.{h}[].{k}": (R, "") for h in ("post_start", "pre_stop")
       for k in ("command", "user", "privileged", "working_dir", "environment")},
    "services.*.post_start[].environment.{}": (R, ""), "services.*.pre_stop[].environment.{}": (R, ""),
    "services.*.privileged": (H, "`false` only (the only way nagaya runs anything); `true` is refused"),
    "services.*.profiles": (H, "the service runs only when one of its profiles is enabled (`compose up --profile "
                               "P`, or COMPOSE_PROFILES=P,Q, which `submit --compose` passes on)"),
    "services.*.pull_policy": (H, "`build`: build before every `up`; `never`: the image must be in your cache; "
                                  "others: images resolve as `nagaya run` resolves them"),
    "services.*.pull_refresh_after": (IG, "images resolve as `nagaya run` resolves them"),
    "services.*.read_only": (H, "the image is always read-only; `false` makes its root writable for the replica's "
                                "run (changes vanish, `nagaya run --writable-tmpfs`)"),
    "services.*.restart": (H, "`no`, `always`, `unless-stopped`, `on-failure[:N]`: exited replicas restart with "
                              "back-off (0.1s doubled for every restart in a row, at most 1 min), counted in "
                              "`compose ps`"),
    "services.*.runtime": (IG, "replicas run under nagaya's own runtime; GPUs come from `gpus` or "
                              "deploy.resources.reservations.devices"),
    "services.*.scale": (H, "as deploy.replicas"),
    "services.*.security_opt": (IG, "no security profiles of its own: runs with your rights and no new privileges"),
    "services.*.shm_size": (IG, "/dev/shm is the container's own, sized by the kernel's default"),
    "services.*.secrets": (H, "secrets mounted read-only at /run/secrets/SOURCE, or `target`"),
    "services.*.secrets[].source": (H, "a secret of the file's top-level `secrets`"),
    "services.*.secrets[].target": (H, "its name under /run/secrets, or an absolute path"),
    "services.*.secrets[].uid": (IG, "the file keeps its owner: you"),
    "services.*.secrets[].gid": (IG, "the file keeps its group: yours"),
    "services.*.secrets[].mode": (IG, "the file keeps its own mode (mounted read-only)"),
    "services.*.sysctls": (IG, "kernel parameters cannot be set per container without privileges"),
    "services.*.sysctls.{}": (IG, ""),
    "services.*.stdin_open": (IG, "replicas run without input; their output goes to the logs"),
    "services.*.stop_grace_period": (H, "time from the stop signal to SIGKILL when the stack stops (default 10s)"),
    "services.*.stop_signal": (H, "the signal a replica gets when the stack stops (default SIGTERM)"),
    "services.*.tmpfs": (H, "an empty directory of the replica's own at each path, removed when the stack stops"),
    "services.*.tty": (IG, "replicas run without a terminal; their output goes to the logs"),
    "services.*.ulimits": (IG, "the job's resource limits apply"), "services.*.ulimits.*": (IG, ""),
    "services.*.ulimits.*.hard": (IG, ""), "services.*.ulimits.*.soft": (IG, ""),
    "services.*.use_api_socket": (R, "there is no Docker engine socket to give"),
    "services.*.user": (H, "your own uid or name (and gid or group) only; replicas always run as you"),
    "services.*.uts": (IG, "replicas share their node's hostname unless `hostname` is set"),
    "services.*.userns_mode": (IG, "replicas always run in a user namespace of your own"),
    "services.*.volumes": (H, "bind mounts (`SRC:DST[:ro]`, relative to the compose file), named volumes (see "
                              "top-level volumes), anonymous volumes and tmpfs (an empty directory per replica)"),
    "services.*.volumes[].type": (H, "`bind`, `volume` or `tmpfs`; others are refused"),
    "services.*.volumes[].source": (H, ""), "services.*.volumes[].target": (H, ""),
    "services.*.volumes[].read_only": (H, ""),
    "services.*.volumes[].consistency": (IG, "Docker Desktop's file sharing only"),
    "services.*.volumes[].bind": (H, "bind options, as below"),
    "services.*.volumes[].bind.propagation": (IG, "mounts are private to the container"),
    "services.*.volumes[].bind.create_host_path": (H, "a missing source directory is made (the default)"),
    "services.*.volumes[].bind.recursive": (IG, "binds are always recursive"),
    "services.*.volumes[].bind.selinux": (IG, "no SELinux relabelling"),
    "services.*.volumes[].volume": (H, "volume options, as below"),
    "services.*.volumes[].volume.labels": (IG, META), "services.*.volumes[].volume.labels.{}": (IG, ""),
    "services.*.volumes[].volume.nocopy": (IG, "volumes start empty; nothing is copied from the image"),
    "services.*.volumes[].volume.subpath": (H, "mount this subdirectory of the volume"),
    "services.*.volumes[].tmpfs": (IG, "tmpfs volumes are directories of the replica's own: no size or mode"),
    "services.*.volumes[].tmpfs.size": (IG, ""), "services.*.volumes[].tmpfs.mode": (IG, ""),
    "services.*.volumes[].image": (R, "image volumes are not supported"),
    "services.*.volumes[].image.subpath": (R, ""),
    "services.*.volumes_from": (R, "give both services the same volumes instead"),
    "services.*.working_dir": (H, "the working directory inside"),
}

# `x-nagaya`: nagaya's own extension, honoured.
KEYS.update({
    "services.*.x-nagaya": (H, "nagaya's placement: `nodes` (how many of the job's nodes, or their names) and "
                               "`gpus` (GPUs per replica)"),
    "services.*.x-nagaya.nodes": (H, ""), "services.*.x-nagaya.gpus": (H, ""),
})

# Maps whose keys the file chooses: a name of the file's own at `*`, free keys at `{}`.
_NAMED = {p.rsplit(".", 1)[0] for p in KEYS if p.endswith(".*")}
_FREE = {p.rsplit(".", 1)[0] for p in KEYS if p.endswith(".{}")}
_NAMED.add("services")


def _value_answer(path: str, value: Any) -> tuple[str, str] | None:
    """Answers that depend on the value (None: the table's)."""
    if path == "services.*.privileged" and value:
        return R, NOPRIV
    if path == "volumes.*.driver" and value not in (None, "local"):
        return R, f"volume driver {value!r}: only local volumes (directories) are supported"
    if path == "services.*.volumes[].type" and value not in ("bind", "volume", "tmpfs"):
        return R, f"{value} mounts are not supported (bind, volume and tmpfs are)"
    return None


@dataclass
class Answer:
    path: str           # where in the file, e.g. services.web.networks
    pattern: str        # the table's key, e.g. services.*.networks
    answer: str
    reason: str


def _children(pattern: str) -> set[str]:
    pre = pattern + "." if pattern else ""
    return {p[len(pre):].split(".")[0].removesuffix("[]") for p in KEYS if p.startswith(pre)} - {"*", "{}"}


def _known(pattern: str) -> bool:
    return pattern in KEYS or pattern in _NAMED or pattern in _FREE or pattern == ""


def check(data: Any, where: str) -> list[Answer]:
    """Walk a compose file (after interpolation): refuse unknown and refused keys (UsageError naming the path),
    and return the ignored ones, outermost only, each to be reported once."""
    from nagaya.errors import UsageError

    ignored: list[Answer] = []

    def walk(node: Any, path: str, pattern: str, inherited: str) -> None:
        if isinstance(node, list):
            if any(k.startswith(pattern + "[]") for k in KEYS):
                for i, item in enumerate(node):
                    walk(item, f"{path}[{i}]", pattern + "[]", inherited)
            return
        if not isinstance(node, dict):
            return
        if pattern in _FREE:
            return
        named = pattern in _NAMED
        kids = _children(pattern)
        for key, val in node.items():
            key = str(key)
            sub = f"{path}.{key}" if path else key
            if key.startswith("x-") and not (pattern == "services.*" and key == "x-nagaya"):
                continue                # extensions: anything goes
            if named:
                child = f"{pattern}.*"
            elif key in kids:
                child = f"{pattern}.{key}" if pattern else key
            else:
                hint = difflib.get_close_matches(key, sorted(kids), 1)
                raise UsageError(f"{where}: {sub}: unknown key (in no compose or Swarm spec)"
                                 + (f"; did you mean {hint[0]}?" if hint else ""))
            if inherited:
                walk(val, sub, child, inherited)
                continue
            ans, reason = KEYS.get(child, (H, ""))
            va = _value_answer(child, val)
            if va is not None:
                ans, reason = va
            if ans == R:
                raise UsageError(f"{where}: {sub}: refused: {reason}")
            if ans == IG:
                ignored.append(Answer(sub, child, ans, reason))
                walk(val, sub, child, IG)
                continue
            walk(val, sub, child, "")

    walk(data, "", "", "")
    return ignored


def strip(data: Any, ignored: list[Answer]) -> Any:
    """The file without its ignored keys: what the typed models see."""
    drop = {a.path for a in ignored}

    def go(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                sub = f"{path}.{k}" if path else str(k)
                if sub in drop or (str(k).startswith("x-") and str(k) != "x-nagaya"):
                    continue
                out[k] = go(v, sub)
            return out
        if isinstance(node, list):
            return [go(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    return go(data, "")


def _between(top: str, path: str) -> list[str]:
    """The table's keys strictly between `top` and `path` (for `a.b` and `a.b.c.d`: `a.b.c`)."""
    out, cur = [], path
    while "." in cur:
        cur = cur.rsplit(".", 1)[0]
        if cur == top or len(cur) <= len(top):
            break
        out.append(cur)
    return out


def table_rows() -> list[tuple[str, str, str]]:
    """(key, answer, meaning or reason) for the README: every key with an answer of its own."""
    rows = []
    for path, (ans, text) in KEYS.items():
        parts = re.split(r"\.(?![^\[]*\])", path)
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        # a key under an ignored or refused one shares its answer; a row adds nothing
        if any(KEYS.get(p, (H, ""))[0] != H for p in parents) or path.endswith(".{}"):
            continue
        if not text:
            continue
        rows.append((path, ans, text))
    return rows


def markdown() -> str:
    lines = ["| key | answer | under nagaya |", "| --- | --- | --- |"]
    for path, ans, text in table_rows():
        under = [p for p in KEYS if p.startswith(path + ".") and not p.endswith(".{}")]
        # honoured keys whose meaning is their parent's are listed in the parent's row
        parts = [p[len(path) + 1:] for p in under if KEYS[p] == (H, "") and ans == H
                 and not any(KEYS.get(q, (H, "x"))[1] for q in _between(path, p))]
        shown = f"`{path}`" + (" (and everything under it)" if ans != H and under else "")
        if parts:
            shown += " with " + ", ".join(f"`{x}`" for x in parts)
        lines.append(f"| {shown} | {ans} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
