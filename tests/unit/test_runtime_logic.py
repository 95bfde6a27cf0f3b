from nagaya.runtime import environment, identity
from nagaya.runtime.identity import Identity
from nagaya.runtime.launcher import _keep_id_map


def test_keep_id_map_keeps_the_users_id():
    assert _keep_id_map(1000, 100000, 65536) == ["0", "100000", "1000", "1000", "1000", "1", "1001", "101000", "64535"]
    assert _keep_id_map(0, 100000, 65536) == ["0", "0", "1", "1", "100000", "65535"]
    assert _keep_id_map(70000, 100000, 65536) == ["0", "100000", "65536", "70000", "70000", "1"]


def test_environment_precedence():
    host = {"PATH": "/host", "HOME": "/h", "KEEP": "k", "LD_PRELOAD": "x.so", "NAGAYAENV_INJ": "i", "SHARED": "h"}
    env = environment.build(host, ("SHARED=img", "PATH=/img/bin"), {"CLI": "c"}, False, "/home/u", "u")
    assert env["PATH"] == "/img/bin" and env["SHARED"] == "img" and env["KEEP"] == "k" and env["INJ"] == "i"
    assert "LD_PRELOAD" not in env and env["CLI"] == "c" and env["HOME"] == "/home/u" and env["USER"] == "u"
    clean = environment.build(host, (), {}, True, "/home/u", "u")
    assert "KEEP" not in clean and clean["PATH"] == environment.DEFAULT_PATH


def test_passwd_and_group_generation():
    ident = Identity(1234, 1234, (27,), "alice", "/home/alice", "/bin/bash")
    pw = identity.passwd_file("root:x:0:0::/root:/bin/sh\nold:x:1234:1:::\n", ident, "/bin/sh")
    assert pw.splitlines() == ["root:x:0:0::/root:/bin/sh", "alice:x:1234:1234::/home/alice:/bin/sh"]
    gr = identity.group_file("root:x:0:\nsudo:x:27:\n", ident)
    assert "root:x:0:" in gr and any(x.endswith(":27:alice") for x in gr.splitlines())
