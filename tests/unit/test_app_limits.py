"""Interactive sessions' limits are the site's settings ([apps] in nagaya.toml -> server.json): the idle time
after which the cull pass ends a session, the longest a session lasts (extensions included), the warning; the
Sessions page states them. The clock is moved, nobody sleeps."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from nagaya import config
from nagaya.errors import UsageError
from nagaya.server.apps import AppSession, AppSessions, from_settings
from nagaya.server.settings import ServerSettings


class FakeJobs:
    """The record operations only: the scheduler is never reached here."""

    def __init__(self, settings: ServerSettings) -> None:
        self.site = SimpleNamespace(settings=settings)
        self.cancelled: list[str] = []

    def cancel(self, user: str, job: str, via: str = "") -> None:
        self.cancelled.append(job)


@pytest.fixture
def state() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nga-limits-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_site_config_reaches_the_server_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site = tmp_path / "nagaya.toml"
    site.write_text("[apps]\nidle_minutes = 30\nmax_hours = 4\nwarn_minutes = 5\n")
    monkeypatch.setattr(config, "SITE_CONFIG", str(site), raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    cfg = config.load()
    assert (cfg.apps.idle_minutes, cfg.apps.max_hours, cfg.apps.warn_minutes) == (30, 4, 5)
    monkeypatch.setenv("NAGAYA_APPS_IDLE_MINUTES", "45")
    assert config.load().apps.idle_minutes == 45
    monkeypatch.setenv("NAGAYA_APPS_MAX_HOURS", "many")
    with pytest.raises(UsageError):
        config.load()


def session(apps: AppSessions, now: float) -> AppSession:
    rec = AppSession(id="e" * 32, user="someone", kind="web", image="r/x:1", job="7", token="ab" * 32,
                     created=now, deadline=now + 3600, last_seen=now)
    apps._save(rec)
    return rec


def test_culling_and_extending_follow_the_sites_limits(state: Path) -> None:
    now = [1_000_000.0]
    st = ServerSettings(database="sqlite://", app_idle_minutes=30, app_max_hours=2, app_warn_minutes=5)
    jobs = FakeJobs(st)
    apps = from_settings(jobs, state)  # type: ignore[arg-type]
    apps.clock = lambda: now[0]
    assert (apps.idle, apps.max_hours, apps.warn_before) == (1800.0, 2.0, 300.0)
    rec = session(apps, now[0])
    shown = rec.public(now[0] + 1400, apps.idle, apps.warn_before)
    assert not shown["warn"] and shown["idle_left"] == 400
    assert rec.public(now[0] + 1600, apps.idle, apps.warn_before)["warn"]       # 5 minutes before: warned
    assert apps.maintain(now[0] + 29 * 60) == []
    # extended once (to the site's 2 h), then no further
    apps.extend("someone", rec.id)
    with pytest.raises(UsageError, match="at most 2 hours"):
        apps.extend("someone", rec.id)
    with pytest.raises(UsageError, match="at most 2 hours"):
        apps.start(SimpleNamespace(name="someone"), "web", "r/x:1", ["serve"], hours=3)  # type: ignore[arg-type]
    ended = apps.maintain(now[0] + 31 * 60)
    assert [x["why"] for x in ended] == ["idle for 31 minutes"] and jobs.cancelled == ["7"]


def test_defaults_when_the_site_says_nothing(state: Path) -> None:
    apps = from_settings(FakeJobs(ServerSettings(database="sqlite://")), state)  # type: ignore[arg-type]
    assert (apps.idle, apps.max_hours, apps.warn_before) == (3600.0, 12.0, 600.0)


def test_the_sessions_page_states_the_limits() -> None:
    from nagaya.server.portal.base import make_templates

    env = make_templates().env
    html = env.get_template("sessions.html").render(
        s=SimpleNamespace(user="someone", csrf="x", is_admin=False), nav="sessions", flash=[], images=["r/x:1"],
        sessions=[], error="", max_hours="4", idle_minutes=30, warn_minutes=5)
    limits = html.split('id="session-limits">', 1)[1].split("</span>", 1)[0]
    assert "after 30 minutes" in limits and "warns 5 minutes" in limits and "at most 4 hours" in limits
    assert 'max="4"' in html and 'value="2"' in html
