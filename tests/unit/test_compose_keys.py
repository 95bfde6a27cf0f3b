"""The key table (keys.py): every key of the Compose Specification answered, the README's table in step
with it, typos and refusals naming their path; the new placement and service semantics, without running."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from nagaya.compose import keys
from nagaya.compose.placement import NodeInfo, _cpus_per_node, labels_of, place, satisfies
from nagaya.compose.spec import parse
from nagaya.errors import UsageError

# Every key path of compose-spec.json (compose-spec/compose-spec, schema/compose-spec.json, 2025), in the
# table's notation: `*` a name of the file's own, `[]` a list item, `{}` a free-form mapping's keys.
SPEC_PATHS = (  # noqa: SIM905
    "configs configs.* configs.*.content configs.*.environment configs.*.external configs.*.external.name "
    "configs.*.file configs.*.labels configs.*.name configs.*.template_driver include include[].env_file "
    "include[].path include[].project_directory models models.* models.*.context_size models.*.model models.*.name "
    "models.*.runtime_flags name networks networks.* networks.*.attachable networks.*.driver networks.*.driver_opts "
    "networks.*.enable_ipv4 networks.*.enable_ipv6 networks.*.external networks.*.external.name networks.*.internal "
    "networks.*.ipam networks.*.ipam.config networks.*.ipam.config[].aux_addresses networks.*.ipam.config[].gateway "
    "networks.*.ipam.config[].ip_range networks.*.ipam.config[].subnet networks.*.ipam.driver networks.*.ipam.options "
    "networks.*.labels networks.*.name secrets secrets.* secrets.*.driver secrets.*.driver_opts secrets.*.environment "
    "secrets.*.external secrets.*.external.name secrets.*.file secrets.*.labels secrets.*.name "
    "secrets.*.template_driver services services.* services.*.annotations services.*.attach services.*.blkio_config "
    "services.*.blkio_config.device_read_bps services.*.blkio_config.device_read_bps[].path "
    "services.*.blkio_config.device_read_bps[].rate services.*.blkio_config.device_read_iops "
    "services.*.blkio_config.device_read_iops[].path services.*.blkio_config.device_read_iops[].rate "
    "services.*.blkio_config.device_write_bps services.*.blkio_config.device_write_bps[].path "
    "services.*.blkio_config.device_write_bps[].rate services.*.blkio_config.device_write_iops "
    "services.*.blkio_config.device_write_iops[].path services.*.blkio_config.device_write_iops[].rate "
    "services.*.blkio_config.weight services.*.blkio_config.weight_device "
    "services.*.blkio_config.weight_device[].path services.*.blkio_config.weight_device[].weight services.*.build "
    "services.*.build.additional_contexts services.*.build.args services.*.build.cache_from services.*.build.cache_to "
    "services.*.build.context services.*.build.dockerfile services.*.build.dockerfile_inline "
    "services.*.build.entitlements services.*.build.extra_hosts services.*.build.isolation services.*.build.labels "
    "services.*.build.network services.*.build.no_cache services.*.build.platforms services.*.build.privileged "
    "services.*.build.provenance services.*.build.pull services.*.build.sbom services.*.build.secrets "
    "services.*.build.secrets[].gid services.*.build.secrets[].mode services.*.build.secrets[].source "
    "services.*.build.secrets[].target services.*.build.secrets[].uid services.*.build.shm_size services.*.build.ssh "
    "services.*.build.tags services.*.build.target services.*.build.ulimits services.*.build.ulimits.* "
    "services.*.build.ulimits.*.hard services.*.build.ulimits.*.soft services.*.cap_add services.*.cap_drop "
    "services.*.cgroup services.*.cgroup_parent services.*.command services.*.configs services.*.configs[].gid "
    "services.*.configs[].mode services.*.configs[].source services.*.configs[].target services.*.configs[].uid "
    "services.*.container_name services.*.cpu_count services.*.cpu_percent services.*.cpu_period services.*.cpu_quota "
    "services.*.cpu_rt_period services.*.cpu_rt_runtime services.*.cpu_shares services.*.cpus services.*.cpuset "
    "services.*.credential_spec services.*.credential_spec.config services.*.credential_spec.file "
    "services.*.credential_spec.registry services.*.depends_on services.*.depends_on.* "
    "services.*.depends_on.*.condition services.*.depends_on.*.required services.*.depends_on.*.restart "
    "services.*.deploy services.*.deploy.endpoint_mode services.*.deploy.labels services.*.deploy.mode "
    "services.*.deploy.placement services.*.deploy.placement.constraints "
    "services.*.deploy.placement.max_replicas_per_node services.*.deploy.placement.preferences "
    "services.*.deploy.placement.preferences[].spread services.*.deploy.replicas services.*.deploy.resources "
    "services.*.deploy.resources.limits services.*.deploy.resources.limits.cpus "
    "services.*.deploy.resources.limits.memory services.*.deploy.resources.limits.pids "
    "services.*.deploy.resources.reservations services.*.deploy.resources.reservations.cpus "
    "services.*.deploy.resources.reservations.devices services.*.deploy.resources.reservations.devices[].capabilities "
    "services.*.deploy.resources.reservations.devices[].count "
    "services.*.deploy.resources.reservations.devices[].device_ids "
    "services.*.deploy.resources.reservations.devices[].driver "
    "services.*.deploy.resources.reservations.devices[].options "
    "services.*.deploy.resources.reservations.generic_resources "
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec "
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec.kind "
    "services.*.deploy.resources.reservations.generic_resources[].discrete_resource_spec.value "
    "services.*.deploy.resources.reservations.memory services.*.deploy.restart_policy "
    "services.*.deploy.restart_policy.condition services.*.deploy.restart_policy.delay "
    "services.*.deploy.restart_policy.max_attempts services.*.deploy.restart_policy.window "
    "services.*.deploy.rollback_config services.*.deploy.rollback_config.delay "
    "services.*.deploy.rollback_config.failure_action services.*.deploy.rollback_config.max_failure_ratio "
    "services.*.deploy.rollback_config.monitor services.*.deploy.rollback_config.order "
    "services.*.deploy.rollback_config.parallelism services.*.deploy.update_config "
    "services.*.deploy.update_config.delay services.*.deploy.update_config.failure_action "
    "services.*.deploy.update_config.max_failure_ratio services.*.deploy.update_config.monitor "
    "services.*.deploy.update_config.order services.*.deploy.update_config.parallelism services.*.develop "
    "services.*.develop.watch services.*.develop.watch[].action services.*.develop.watch[].exec "
    "services.*.develop.watch[].exec.command services.*.develop.watch[].exec.environment "
    "services.*.develop.watch[].exec.privileged services.*.develop.watch[].exec.user "
    "services.*.develop.watch[].exec.working_dir services.*.develop.watch[].ignore services.*.develop.watch[].include "
    "services.*.develop.watch[].initial_sync services.*.develop.watch[].path services.*.develop.watch[].target "
    "services.*.device_cgroup_rules services.*.devices services.*.devices[].permissions services.*.devices[].source "
    "services.*.devices[].target services.*.dns services.*.dns_opt services.*.dns_search services.*.domainname "
    "services.*.entrypoint services.*.env_file services.*.env_file[].format services.*.env_file[].path "
    "services.*.env_file[].required services.*.environment services.*.expose services.*.extends "
    "services.*.extends.file services.*.extends.service services.*.external_links services.*.extra_hosts "
    "services.*.gpus services.*.gpus[].capabilities services.*.gpus[].count services.*.gpus[].device_ids "
    "services.*.gpus[].driver services.*.gpus[].options services.*.group_add services.*.healthcheck "
    "services.*.healthcheck.disable services.*.healthcheck.interval services.*.healthcheck.retries "
    "services.*.healthcheck.start_interval services.*.healthcheck.start_period services.*.healthcheck.test "
    "services.*.healthcheck.timeout services.*.hostname services.*.image services.*.init services.*.ipc "
    "services.*.isolation services.*.label_file services.*.labels services.*.links services.*.logging "
    "services.*.logging.driver services.*.logging.options services.*.mac_address services.*.mem_limit "
    "services.*.mem_reservation services.*.mem_swappiness services.*.memswap_limit services.*.models "
    "services.*.models.* services.*.models.*.endpoint_var services.*.models.*.model_var services.*.network_mode "
    "services.*.networks services.*.networks.* services.*.networks.*.aliases services.*.networks.*.driver_opts "
    "services.*.networks.*.gw_priority services.*.networks.*.interface_name services.*.networks.*.ipv4_address "
    "services.*.networks.*.ipv6_address services.*.networks.*.link_local_ips services.*.networks.*.mac_address "
    "services.*.networks.*.priority services.*.oom_kill_disable services.*.oom_score_adj services.*.pid "
    "services.*.pids_limit services.*.platform services.*.ports services.*.ports[].app_protocol "
    "services.*.ports[].host_ip services.*.ports[].mode services.*.ports[].name services.*.ports[].protocol "
    "services.*.ports[].published services.*.ports[].target services.*.post_start services.*.post_start[].command "
    "services.*.post_start[].environment services.*.post_start[].privileged services.*.post_start[].user "
    "services.*.post_start[].working_dir services.*.pre_stop services.*.pre_stop[].command "
    "services.*.pre_stop[].environment services.*.pre_stop[].privileged services.*.pre_stop[].user "
    "services.*.pre_stop[].working_dir services.*.privileged services.*.profiles services.*.provider "
    "services.*.provider.options services.*.provider.type services.*.pull_policy services.*.pull_refresh_after "
    "services.*.read_only services.*.restart services.*.runtime services.*.scale services.*.secrets "
    "services.*.secrets[].gid services.*.secrets[].mode services.*.secrets[].source services.*.secrets[].target "
    "services.*.secrets[].uid services.*.security_opt services.*.shm_size services.*.stdin_open "
    "services.*.stop_grace_period services.*.stop_signal services.*.storage_opt services.*.sysctls services.*.tmpfs "
    "services.*.tty services.*.ulimits services.*.ulimits.* services.*.ulimits.*.hard services.*.ulimits.*.soft "
    "services.*.use_api_socket services.*.user services.*.userns_mode services.*.uts services.*.volumes "
    "services.*.volumes[].bind services.*.volumes[].bind.create_host_path services.*.volumes[].bind.propagation "
    "services.*.volumes[].bind.recursive services.*.volumes[].bind.selinux services.*.volumes[].consistency "
    "services.*.volumes[].image services.*.volumes[].image.subpath services.*.volumes[].read_only "
    "services.*.volumes[].source services.*.volumes[].target services.*.volumes[].tmpfs "
    "services.*.volumes[].tmpfs.mode services.*.volumes[].tmpfs.size services.*.volumes[].type "
    "services.*.volumes[].volume services.*.volumes[].volume.labels services.*.volumes[].volume.nocopy "
    "services.*.volumes[].volume.subpath services.*.volumes_from services.*.working_dir version volumes volumes.* "
    "volumes.*.driver volumes.*.driver_opts volumes.*.external volumes.*.external.name volumes.*.labels "
    "volumes.*.name "
).split()


def test_every_key_of_the_spec_has_an_answer() -> None:
    assert len(SPEC_PATHS) > 300
    missing = [p for p in SPEC_PATHS if p not in keys.KEYS and not p.endswith(".{}")]
    assert not missing, missing
    assert {a for a, _ in keys.KEYS.values()} == {keys.H, keys.IG, keys.R}
    # every key with an answer of its own says why or what it means
    assert all(text for path, (ans, text) in keys.KEYS.items()
               if not path.endswith("{}") and ans != keys.H and path in [r[0] for r in keys.table_rows()])


def test_readme_table_is_the_code_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    m = re.search(r"<!-- compose-keys:[^\n]*-->\n(.*?)<!-- /compose-keys -->", readme, re.S)
    assert m, "the README's compose key table is missing"
    assert m.group(1) == keys.markdown(), "README out of date: python -m nagaya.compose.keys"


def _lines(data: dict) -> list[str]:
    out: list[str] = []
    parse(data, {}, "c.yml", set(), out.append)
    return out


def test_ignored_keys_one_line_each_outermost_only() -> None:
    lines = _lines({"version": "3", "services": {"web": {
        "image": "bb", "networks": {"front": {"aliases": ["w"], "ipv4_address": "10.0.0.2"}},
        "logging": {"driver": "json-file", "options": {"max-size": "1m"}},
        "ports": [{"target": 80, "mode": "ingress", "host_ip": "0.0.0.0"}], "x-custom": {"anything": 1}}},
        "networks": {"front": {"driver": "overlay", "ipam": {"config": [{"subnet": "10.0.0.0/24"}]}}},
        "x-common": {"whatever": True}})
    assert [x.split(": ignored: ")[0] for x in lines] == [
        "c.yml: version", "c.yml: services.web.networks", "c.yml: services.web.logging",
        "c.yml: services.web.ports[0].mode", "c.yml: services.web.ports[0].host_ip", "c.yml: networks"]
    assert lines[1] == f"c.yml: services.web.networks: ignored: {keys.HOSTNET}"


@pytest.mark.parametrize("svc,msg", [
    ({"image": "bb", "networks": {"a": {"alises": ["x"]}}},
     "services.web.networks.a.alises: unknown key (in no compose or Swarm spec); did you mean aliases?"),
    ({"image": "bb", "helthcheck": {}}, "services.web.helthcheck: unknown key (in no compose or Swarm spec); "
                                        "did you mean healthcheck?"),
    ({"image": "bb", "privileged": True}, "services.web.privileged: refused: containers run with your own rights"),
    ({"image": "bb", "devices": ["/dev/fuse"]}, "services.web.devices: refused: devices other than GPUs"),
    ({"image": "bb", "volumes_from": ["db"]}, "services.web.volumes_from: refused"),
    ({"image": "bb", "deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["tpu"]}]}}}},
     "refused: device capabilities ['tpu']: only GPUs"),
    ({"image": "bb", "user": "nobody"}, "services.web.user: refused: user 'nobody'"),
    ({"image": "bb", "deploy": {"replicas": 2}, "container_name": "xy"}, "services.web.container_name: a container "
                                                                         "name is unique"),
])
def test_refusals_and_typos_name_the_path(svc: dict, msg: str) -> None:
    with pytest.raises(UsageError) as e:
        parse({"services": {"web": svc}}, {}, "c.yml", set())
    assert msg in e.value.message and e.value.message.startswith("c.yml: "), e.value.message


def test_value_dependent_answers() -> None:
    parse({"services": {"web": {"image": "bb", "privileged": False}}}, {}, "c.yml", set())
    with pytest.raises(UsageError, match=r"volumes.v.driver: refused: volume driver 'nfs'"):
        parse({"services": {"web": {"image": "bb"}}, "volumes": {"v": {"driver": "nfs"}}}, {}, "c.yml", set())


def test_service_semantics() -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    p = parse({"services": {
        "web": {"image": "bb", "restart": "on-failure:4", "user": f"{me}:{os.getgid()}", "scale": 2,
                "ports": ["127.0.0.1:8000-8001:9000-9001/udp"], "extra_hosts": ["a:10.0.0.1", "b=::1"],
                "stop_signal": "SIGUSR1", "stop_grace_period": "1m", "env_file": ["a.env", {"path": "b.env",
                                                                                         "required": False}]},
        "gpu": {"image": "bb", "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["1", "3"]}]}}}},
        "all": {"image": "bb", "gpus": "all"},
        "swarm": {"image": "bb", "deploy": {"resources": {"reservations": {"generic_resources": [
            {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 2}}]}}, "restart_policy": {
            "condition": "on-failure", "delay": "2s", "max_attempts": 3, "window": "1m"}}},
        "built": {"build": {"context": "./app", "args": ["A=1"]}},
    }}, {}, "c.yml", set())
    web = p.services["web"]
    assert web.replicas == 2 and web.stop_grace_period == 60
    rule = web.restart_rule
    assert rule is not None and (rule.condition, rule.delay, rule.max_attempts) == ("on-failure", 0.1, 4)
    assert [(x.target, x.host_port, x.protocol) for x in web.ports] == [(9000, 8000, "udp"), (9001, 8001, "udp")]
    assert web.extra_hosts == {"a": "10.0.0.1", "b": "::1"}
    assert [(f.path, f.required) for f in web.env_file] == [("a.env", True), ("b.env", False)]
    assert p.services["gpu"].gpu_request == (2, [1, 3])
    assert p.services["all"].gpu_request == ("all", None)
    assert p.services["swarm"].gpu_request == (2, None)
    sw = p.services["swarm"].restart_rule
    assert sw is not None and (sw.delay, sw.window) == (2.0, 60.0)
    assert p.image_of("built") == "default-built" and p.services["built"].build.args == {"A": "1"}


def test_profiles() -> None:
    data = {"services": {"web": {"image": "bb", "depends_on": {"dbg": {"condition": "service_started",
                                                                        "required": False}}},
                         "dbg": {"image": "bb", "profiles": ["debug"]},
                         "needs": {"image": "bb", "profiles": ["tools"], "depends_on": ["dbg"]}}}
    assert sorted(parse(data, {}, "c.yml", set()).services) == ["web"]
    assert sorted(parse(data, {}, "c.yml", {"debug"}).services) == ["dbg", "web"]
    with pytest.raises(UsageError, match=r"services\.needs\.depends_on: dbg is not enabled"):
        parse(data, {}, "c.yml", {"tools"})
    assert sorted(parse(data, {"COMPOSE_PROFILES": "tools,debug"}, "c.yml").services) == ["dbg", "needs", "web"]


def test_placement_constraints_global_and_resources() -> None:
    assert labels_of("gpu,zone=a,rack:3") == {"gpu": "true", "zone": "a", "rack": "3"}
    assert _cpus_per_node("2(x3),1") == [2, 2, 2, 1]
    info = {"n1": NodeInfo(2, 1 << 30, {"zone": "a"}, True, "x86_64"),
            "n2": NodeInfo(2, 1 << 30, {"zone": "b"}, False, "x86_64"),
            "n3": NodeInfo(1, 1 << 29, {"zone": "b", "ssd": "true"}, False, "x86_64")}
    assert satisfies("n3", info["n3"], [("node.labels.ssd", "==", "true"), ("node.role", "!=", "manager")]) == ""
    assert satisfies("n1", info["n1"], [("node.role", "==", "worker")]) == "node.role == worker"
    p = parse({"services": {
        "db": {"image": "bb", "deploy": {"placement": {"constraints": ["node.role == manager"]}}},
        "agent": {"image": "bb", "deploy": {"mode": "global"}},
        "work": {"image": "bb", "deploy": {"replicas": 4, "placement": {
            "constraints": ["node.labels.zone == b"], "max_replicas_per_node": 2},
            "resources": {"reservations": {"cpus": "0.5", "memory": "256M"}, "limits": {"cpus": "1.5"}}}},
    }}, {}, "c.yml", set())
    reps = place(p, ["n1", "n2", "n3"], None, info)
    where = {r.name: r.node for r in reps}
    assert where["db-1"] == "n1" and sorted(n for k, n in where.items() if k.startswith("agent")) == ["n1", "n2", "n3"]
    assert sorted(n for k, n in where.items() if k.startswith("work")) == ["n2", "n2", "n3", "n3"]
    assert all(r.cpus == 2 and r.mem == 256 << 20 for r in reps if r.service == "work")
    small = {**info, "n3": NodeInfo(0.5, 1 << 29, {"zone": "b"}, False, "x86_64")}
    with pytest.raises(UsageError, match=r"cannot place work-4: it reserves 0.5 CPUs and 256 MiB and no node"):
        place(p, ["n1", "n2", "n3"], None, small)
    with pytest.raises(UsageError, match=r"cannot place db: no node of the job meets its placement constraints "
                                         r"\(n2: not node.role == manager"):
        place(p, ["n2", "n3"], None, {k: NodeInfo(2, 1 << 30, v.labels, False, "x86_64")
                                      for k, v in info.items() if k != "n1"})
    assert len(place(p, ["x1", "x2"])) == 7      # checking a file before its job: constraints are not evaluated


def test_gpus_all_and_device_ids() -> None:
    p = parse({"services": {"a": {"image": "bb", "gpus": "all"},
                            "b": {"image": "bb", "deploy": {"resources": {"reservations": {"devices": [
                                {"capabilities": ["gpu"], "device_ids": ["1"]}]}}}}}}, {}, "c.yml", set())
    reps = {r.name: r for r in place(p, ["n1", "n2"], {"n1": [0, 1], "n2": [0, 1]})}
    assert reps["a-1"].gpus == [0, 1] and reps["b-1"].gpus == [1] and reps["a-1"].node != reps["b-1"].node
