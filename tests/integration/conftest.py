"""The site fixtures (a real `nagaya site` on loopback) for integration tests outside tests/integration/site/."""

from tests.integration.site.conftest import base_dir, site, site_system  # noqa: F401
