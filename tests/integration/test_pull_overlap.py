"""A pull converts the upper layers while the lower ones still download: when a lower layer then fails (bad
bytes, a cut connection), the pull ends with that layer's one-line error and nothing is cached; the upper
layers that did arrive stay as verified blobs (a later pull does not fetch them again)."""

from __future__ import annotations

import pytest

from tests.integration.test_registry_client import (  # noqa: F401  (fixtures)
    FakeRegistry,
    SiteUser,
    _pull_fails,
    busybox_layer,
    cache_root,
    fake,
    hand_image,
    msg_layer,
    ok,
    owner,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["corrupt", "truncate"])
def test_lower_layer_fails_while_upper_converts(owner: SiteUser, fake: FakeRegistry, how: str) -> None:  # noqa: F811
    img = hand_image([busybox_layer(), msg_layer("a"), msg_layer("top")])
    fake.add("1", img)
    getattr(fake, how).add(img.layer_digests[0])                # the bottom layer: fetched last, merged last
    env = _pull_fails(owner, f"{fake.host}/lab/ovl-{how}:1",
                      r"digest mismatch" if how == "corrupt" else r"truncated|interrupted")
    blobs = cache_root(env) / "blobs" / "sha256"
    assert not (blobs / img.layer_digests[0][7:]).exists()
    getattr(fake, how).clear()
    fake.log.clear()
    ok(owner.nagaya("pull", f"{fake.host}/lab/ovl-{how}:1", env=env))
    fetched = [line for line in fake.log if line.startswith("GET") and "/blobs/" in line]
    assert any(img.layer_digests[0] in line for line in fetched)
    assert not any(img.layer_digests[2] in line for line in fetched), fetched     # kept from the failed pull
    assert ok(owner.nagaya("run", f"{fake.host}/lab/ovl-{how}:1", "/bin/busybox", "cat", "/msg",
                           env=env)).stdout == "top"
