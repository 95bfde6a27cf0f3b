import pytest

from nagaya.cli.run_cmd import parse_args, parse_bind
from nagaya.errors import UsageError


def test_options_stop_at_the_image():
    a = parse_args("run", ["-e", "A=1", "--env=B=2", "-B", "/x:/y:ro", "--gpus", "img", "ls", "-l", "--env", "X"])
    assert a.env == ["A=1", "B=2"] and a.bind == ["/x:/y:ro"] and a.gpus == "all"
    assert a.image == "img" and a.command == ["ls", "-l", "--env", "X"]


def test_gpus_value_backend_and_flags():
    a = parse_args("run", ["--gpus", "0,1", "--backend", "runc", "--writable-tmpfs", "--pwd", "/t", "i"])
    assert (a.gpus, a.backend, a.writable_tmpfs, a.pwd, a.image, a.command) == ("0,1", "runc", True, "/t", "i", [])
    assert parse_args("run", ["--", "-weird-image"]).image == "-weird-image"


@pytest.mark.parametrize("args", [[], ["--backend", "docker", "i"], ["--pwd"], ["--nope", "i"]])
def test_errors(args):
    with pytest.raises((UsageError, SystemExit)):
        parse_args("run", args)


def test_shell_has_no_entrypoint_option():
    with pytest.raises(UsageError):
        parse_args("shell", ["--entrypoint", "x", "img"])


def test_bind_forms():
    b = parse_bind("/a,/b:/c,/d:/e:ro")
    assert [(x.src, x.dst, x.readonly) for x in b] == [("/a", "/a", False), ("/b", "/c", False), ("/d", "/e", True)]
    with pytest.raises(UsageError):
        parse_bind("/a:/b:rx")
