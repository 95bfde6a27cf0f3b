"""The portal's side of the `Scheduler` protocol (sched/onbehalf.py, server/jobs.py's SpoolScheduler): what a
typed JobSpec becomes on the wire to the dispatcher, the strict check both ends apply, typed answers, and the
per-user cap over every operation, extras included. The real crossing (root dispatcher, a user's backend) is
tests/security/test_server_dispatcher.py's and the e2e portal tests'."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from nagaya.errors import NagayaError, NotFound, UsageError
from nagaya.sched.models import JobInfo, JobSpec
from nagaya.sched.onbehalf import (
    USER_OPS,
    WIRE_FIELDS,
    Bounded,
    JobsBusy,
    LogTail,
    PullLogin,
    info_from_wire,
    log_tail,
    spec_from_wire,
    spec_to_wire,
)
from nagaya.server.app_launch import AppRequest
from nagaya.server.jobs import Dispatched, SpoolScheduler, _check

DIGEST = "sha256:" + "a" * 64


class Wire:
    """The spool's shape (call(user, op, args)): records each request, answers from `answers`."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers, self.sent = answers, []  # type: ignore[var-annotated]
        self.gate = threading.Event()
        self.gate.set()

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        self.sent.append((user, op, args))
        self.gate.wait(10)
        if op not in self.answers:
            raise NotFound(f"no {op}")
        return self.answers[op]


def spec(**kw: Any) -> JobSpec:
    return JobSpec(image="r:5000/p/x:1", ref="", digest=DIGEST, command=["id", "-u"], **kw)


def test_only_the_server_chosen_fields_cross() -> None:
    s = spec(cwd="/etc", env={"LD_PRELOAD": "/tmp/x.so"}, user="root", script="#!/bin/sh\nrm -rf ~", partition="gpu")
    wire = spec_to_wire(s)
    assert set(wire) <= set(WIRE_FIELDS) and "ref" not in wire          # an empty ref: the user's side pins
    assert not {"cwd", "env", "user", "script", "partition"} & set(wire)
    back = spec_from_wire(wire)
    assert (back.image, back.digest, back.command, back.cwd, back.env, back.user) == \
        ("r:5000/p/x:1", DIGEST, ["id", "-u"], "", {}, "")


@pytest.mark.parametrize("bad", [
    None, [], {"image": "x", "cwd": "/etc"}, {"image": "x", "env": {}}, {"image": "x", "nodes": "2"},
    {"image": "x", "nodes": True}, {"image": "x", "command": "id"}, {"image": "x", "command": ["id", 1]},
    {"image": 5}, {"digest": DIGEST}, {"image": ""}])
def test_a_malformed_spec_is_refused(bad: Any) -> None:
    with pytest.raises(UsageError):
        spec_from_wire(bad)


def test_the_dispatcher_applies_the_same_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    from nagaya.server import jobs

    req = {"id": "0" * 32, "user": "nobody-such-user-xyz", "op": "submit", "args": {"spec": {"image": "x"}}}
    with pytest.raises(NagayaError):            # an unknown user first: nothing about the spec is looked at
        _check(req, "nagaya")
    monkeypatch.setattr(jobs, "target_user", lambda user, svc: pwd.getpwuid(0))     # a known user, whoever
    assert _check(req, "nagaya")[1] == "submit"
    for bad in ({"image": "x", "cwd": "/"}, {"image": "x", "nodes": "1"}, {}):
        with pytest.raises(UsageError):
            _check({**req, "args": {"spec": bad}}, "nagaya")
    with pytest.raises(UsageError):
        _check({**req, "op": "suspend", "args": {}}, "nagaya")         # job_id missing


def test_answers_become_typed_or_are_refused() -> None:
    info = info_from_wire({"id": "7", "user": "bob", "state": "RUNNING", "exit_code": None, "cpus": 2,
                           "nodes": None, "someday": "a field this side does not know"})
    assert isinstance(info, JobInfo) and (info.id, info.state, info.cpus, info.nodes) == ("7", "RUNNING", 2, "")
    for bad in (None, [], {"id": 7, "state": "RUNNING"}, {"id": "7"}, {"id": "7", "state": "X", "cpus": "2"},
                {"id": "7", "state": "X", "command": "id"}):
        with pytest.raises(NagayaError):
            info_from_wire(bad)


def test_the_dispatcher_scheduler_speaks_the_protocol() -> None:
    job = {"id": "7", "user": "bob", "state": "RUNNING", "image": "r:5000/p/x:1", "digest": DIGEST}
    wire = Wire({"submit": {"id": 7}, "app_submit": {"id": "8"}, "list": [job], "status": job, "cancel": {},
                 "suspend": {}, "resume": {}, "usage": [{"t": 1.0}, "junk"],
                 "logs": {"log": "hello\n", "truncated": True}})
    login = PullLogin(registry="r:5000", server="https://site", username="bob", secret="s3cret")
    sched = Dispatched(wire).for_user("bob", login)
    assert isinstance(sched, SpoolScheduler) and sched.name == "dispatcher"
    assert sched.submit(spec(cwd="/etc")) == "7"
    user, op, args = wire.sent[-1]
    assert (user, op) == ("bob", "submit") and "cwd" not in args["spec"] and args["login"]["secret"] == "s3cret"
    assert sched.submit_app(spec(), AppRequest(session="e" * 32, kind="jupyter", token="f" * 64)) == "8"
    _, op, args = wire.sent[-1]
    assert op == "app_submit" and args["session"] == "e" * 32 and args["kind"] == "jupyter" and "spec" in args
    assert sched.list() == [info_from_wire(job)] and sched.status("7").digest == DIGEST
    for op in ("cancel", "suspend", "resume"):
        getattr(sched, op)("7")
        assert wire.sent[-1][1:] == (op, {"job_id": "7"})
    assert sched.usage("7") == [{"t": 1.0}]
    assert log_tail(sched, "7") == LogTail(log="hello\n", truncated=True)
    assert b"".join(sched.logs("7")) == b"hello\n"
    with pytest.raises(NotFound):
        Dispatched(Wire({})).for_user("bob").status("9")


def test_secrets_stay_out_of_reprs() -> None:
    login = PullLogin(registry="r", server="s", username="bob", secret="s3cret")
    app = AppRequest(session="e" * 32, kind="jupyter", token="f" * 64)
    assert "s3cret" not in repr(login) and "f" * 64 not in repr(app)


def test_the_cap_covers_extras_too() -> None:
    wire = Wire({"app_submit": {"id": "1"}, "list": []})
    wire.gate.clear()
    capped = Bounded(Dispatched(wire))
    app = AppRequest(session="e" * 32, kind="web")
    threads = [threading.Thread(target=capped.for_user("mallory").submit_app, args=(spec(), app))
               for _ in range(USER_OPS)]
    for t in threads:
        t.start()
    while len(wire.sent) < USER_OPS:
        threading.Event().wait(0.01)
    with pytest.raises(JobsBusy):
        capped.for_user("mallory").list()
    with pytest.raises(JobsBusy):
        capped.for_user("mallory").submit_app(spec(), app)
    wire.gate.set()
    for t in threads:
        t.join(10)
    assert capped.for_user("mallory").list() == []
    assert capped.name == "dispatcher"


def test_the_dispatchers_extras_are_typed_and_checked() -> None:
    """terminal, app_relay and submit_build: typed arguments in, checked answers out; a socket name that is a
    path, or no secret, is refused before the server would connect anywhere."""
    sock = "d" * 32 + ".sock"
    wire = Wire({"terminal": {"socket": sock, "secret": "s" * 64}, "app_relay": {"socket": sock},
                 "build_submit": {"id": "12"}})
    sched = Dispatched(wire).for_user("bob")
    assert sched.terminal("7", 30, 100) == (sock, "s" * 64)
    assert wire.sent[-1] == ("bob", "terminal", {"job_id": "7", "rows": 30, "cols": 100})
    assert sched.app_relay("e" * 32, "7", "n2") == sock
    assert wire.sent[-1] == ("bob", "app_relay", {"session": "e" * 32, "job_id": "7", "node": "n2"})
    login = PullLogin(registry="r:5000", server="https://site", username="bob", secret="s3cret")
    build = JobSpec(image="(build) r:5000/bob/x:1", ref="", digest="", command=[], name="build-x", cpus=1,
                    time_limit=3600, cwd="/etc", env={"LD_PRELOAD": "/tmp/x.so"})
    assert sched.submit_build({"id": "a" * 32}, login, build, upload="c" * 32 + ".ctx") == "12"
    user, op, args = wire.sent[-1]
    assert (user, op) == ("bob", "build_submit") and args["upload"] == "c" * 32 + ".ctx" and "rebuild_of" not in args
    assert "cwd" not in args["spec"] and "env" not in args["spec"]       # only WIRE_FIELDS cross
    assert spec_from_wire(args["spec"]).time_limit == 3600                 # what the dispatcher checks
    for bad in ({"socket": "../../x.sock", "secret": "s"}, {"socket": sock, "secret": ""}, {"socket": "x"}, []):
        nonsense = Dispatched(Wire({"terminal": bad, "app_relay": bad})).for_user("bob")
        with pytest.raises(NagayaError):
            nonsense.terminal("7")
        if isinstance(bad, dict) and bad.get("secret") != "":
            with pytest.raises(NagayaError):
                nonsense.app_relay("e" * 32, "7", "n2")


def test_what_runs_as_the_user_gets_only_the_sites_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for job operations, terminals and relays: the account's names, a fixed PATH, and of the
    dispatcher's own environment only SITE_ENV."""
    import pwd

    from nagaya.sched.onbehalf import SITE_ENV, user_env

    monkeypatch.setenv("SLURM_CONF", "/srv/slurm/slurm.conf")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PYTHONPATH", "/tmp/evil")
    monkeypatch.delenv("PBS_CONF_FILE", raising=False)
    pw = pwd.getpwuid(0)
    env = user_env(pw, TERM="xterm-256color")
    assert env["SLURM_CONF"] == "/srv/slurm/slurm.conf" and env["TERM"] == "xterm-256color"
    assert env["HOME"] == pw.pw_dir and env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert set(env) <= {"HOME", "USER", "LOGNAME", "LANG", "PATH", "TERM", *SITE_ENV}
    assert "PBS_CONF_FILE" not in env
