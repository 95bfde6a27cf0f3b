import pytest

from nagaya.errors import UsageError
from nagaya.image.reference import is_digest, parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("text", "registry", "path", "tag", "digest"), [
    ("busybox", "", "busybox", None, None),
    ("busybox:1.36", "", "busybox", "1.36", None),
    ("lab/tools/py_3.11:v1", "", "lab/tools/py_3.11", "v1", None),
    ("127.0.0.1:5000/alice/app:latest", "127.0.0.1:5000", "alice/app", "latest", None),
    ("localhost/x", "localhost", "x", None, None),
    ("reg.example.org/a/b@" + D, "reg.example.org", "a/b", None, D),
    ("reg.example.org:443/a/b:t@" + D, "reg.example.org:443", "a/b", "t", D),
    ("[::1]:5000/a/b", "[::1]:5000", "a/b", None, None),
    ("a--b__c.d", "", "a--b__c.d", None, None),
])
def test_valid(text, registry, path, tag, digest):
    r = parse(text)
    assert (r.registry, r.path, r.tag, r.digest) == (registry, path, tag, digest)
    assert str(r) == text


@pytest.mark.parametrize("text", ["", "UPPER", "a..b", "../etc", "a/../b", "a//b", "-a", "a-", "a___b", "a:",
                                  "a:-tag", "a@sha256:xyz", "a@md5:" + "0" * 32, "a b", "a/.hidden", "h:99999x/a",
                                  "x" * 300, "a:" + "t" * 129])
def test_invalid(text):
    with pytest.raises(UsageError):
        parse(text)


def test_is_digest():
    assert is_digest(D) and not is_digest(D[:-1]) and not is_digest(D.upper()) and not is_digest("sha512:" + "a" * 64)
