"""Security tests: adversarial, against a real site (tests/integration/site/conftest.py starts it: registry +
server as the `nagaya` service account, the root job dispatcher, PAM users). Attackers and victims are
unprivileged Unix users (setpriv); the service account's own attacks run as `nagaya`. Each test asserts that
the attack fails AND that the victim's work still succeeds. Under CI=true a missing component is an error."""

from __future__ import annotations

from tests.integration.site.conftest import (  # noqa: F401 - fixtures shared with the site tests
    base_dir,
    image_archive,
    logged_in,
    people,
    site,
    site_system,
)

