"""Password limits count attempts in flight, and cannot be turned against a user by someone else.

* 30 concurrent guesses: PAM is asked at most MAX_FAILURES times (each asking is a `login.fail` audit event
  when the password is wrong), the rest are refused (429) before PAM.
* Another local user (all share 127.0.0.1) guesses the victim's password until the limit refuses: the
  victim still logs in from the browser and the CLI they logged in with before (device tokens), and their
  personal access token works throughout; a client new to the victim's account is refused, which shows the
  attack did spend the shared budget, and the attacker's own device token does not count for the victim."""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nagaya.server.ratelimit import MAX_FAILURES
from tests.integration.site.conftest import Site, SiteUser, module_people
from tests.security.helpers import audit, portal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "ll", ("target", "victim", "attacker", "admin"))


def _api_login(site: Site, user: str, password: str, device: str | None = None) -> httpx.Response:
    with httpx.Client(timeout=60) as c:                 # a new client each time: no cookies, no device
        return c.post(f"{site.server}/api/login", auth=(user, password),
                      headers={"X-Nagaya-Device": device} if device else {})


def _device(u: SiteUser, site: Site, name: str | None = None) -> str | None:
    data = json.loads(u.auth_file.read_text())
    return data.get("nagaya-devices", {}).get(f"{name or u.name}@{site.server}")


def test_concurrent_guesses_reach_pam_at_most_the_limit(site: Site, users: dict[str, SiteUser]) -> None:
    target, admin = users["target"], users["admin"].creds(site.registry)
    before = len(audit(site, admin, user=target.name, action="login.fail"))
    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(lambda i: _api_login(site, target.name, f"guess-{i}").status_code, range(30)))
    asked = len(audit(site, admin, user=target.name, action="login.fail")) - before
    assert codes.count(401) == asked and asked <= MAX_FAILURES, (codes, asked)
    assert codes.count(429) >= 30 - MAX_FAILURES, codes


def test_a_third_party_cannot_lock_the_victim_out(site: Site, users: dict[str, SiteUser]) -> None:
    victim, attacker = users["victim"], users["attacker"]
    dev = _device(victim, site)
    assert dev, "`nagaya login` kept no device token"
    browser, r = portal(site, victim.name, victim.password)              # the victim's browser, before
    assert r.status_code in (200, 303) and "nagaya_device" in browser.cookies
    browser.cookies.delete("nagaya_session")

    # The attacker guesses with the CLI, as themself, until refused.
    outs = [attacker.nagaya("login", "--password-stdin", "-u", victim.name, site.server,
                            input=f"guess-{i}\n") for i in range(MAX_FAILURES + 2)]
    assert all(o.returncode != 0 for o in outs)
    assert "too many failed attempts" in outs[-1].stderr.lower(), outs[-1].stderr
    # ... with their own device token too: it is good for their own account only
    assert _api_login(site, victim.name, "guess-x", _device(attacker, site)).status_code == 429
    assert _api_login(site, victim.name, "guess-y", f"{secrets.token_urlsafe(12)}.{'0' * 32}").status_code == 429
    assert _api_login(site, victim.name, victim.password).status_code == 429    # a new client: the shared budget

    # The victim is not locked out: their CLI, their browser and their token all work.
    r2 = victim.nagaya("login", "--password-stdin", "--json", site.server, input=victim.password + "\n")
    assert r2.returncode == 0, r2.stderr
    _, r = portal(site, victim.name, victim.password, client=browser)
    assert r.status_code in (200, 303) and "nagaya_session" in browser.cookies, r.text
    assert browser.get("/dashboard").status_code == 200
    creds = victim.creds(site.registry)
    assert site.token(f"repository:{victim.name}/app:pull", creds).status_code == 200
    assert site.api("GET", "/api/me", auth=creds).json()["name"] == victim.name
    assert _api_login(site, victim.name, victim.password, _device(victim, site)).status_code == 200


def test_a_device_has_a_budget_of_its_own(site: Site, users: dict[str, SiteUser]) -> None:
    """A device token is no bypass: guesses with it are limited too, apart from everyone else's."""
    target = users["target"]
    r = _api_login(site, target.name, target.password, None)
    # target was guessed at above: a new client is refused, their CLI (a device of theirs) is not
    assert r.status_code == 429
    ok = target.nagaya("login", "--password-stdin", "--json", site.server, input=target.password + "\n")
    assert ok.returncode == 0, ok.stderr
    dev = _device(target, site)
    codes = [_api_login(site, target.name, f"slip-{i}", dev).status_code for i in range(MAX_FAILURES + 1)]
    assert codes == [401] * MAX_FAILURES + [429], codes
