"""`nagaya admin maintain` cleans what piles up: portal job logs older than `[server] job_log_days` and
personal access tokens that expired or were revoked more than `expired_token_days` ago."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.site.conftest import Site, module_people
from tests.integration.site.test_lifecycle import maintain

pytestmark = pytest.mark.integration


def test_maintain_prunes_old_job_logs_and_dead_tokens(site: Site) -> None:
    who = module_people(site, "pr", ("user",))["user"]
    # Job logs as the slurmrestd gateway lays them out: STATE/job-logs/USER/slurm-ID.out, written by the user.
    d = site.state_dir / "job-logs" / who.name
    d.mkdir(parents=True, exist_ok=True)
    old, fresh, elsewhere = d / "slurm-1.out", d / "slurm-2.out", site.state_dir / "keep-me.txt"
    for f in (old, fresh, elsewhere):
        f.write_text("output\n")
        os.chown(f, who.u.uid, who.u.gid)
    (d / "link").symlink_to(elsewhere)      # a planted link is removed as a link, never followed
    month_ago = time.time() - 40 * 86400
    for f in (old, d / "link"):
        os.utime(f, (month_ago, month_ago), follow_symlinks=False)
    # Two of the user's personal access tokens died long ago; the login token is alive.
    r = site.api("POST", "/api/login", auth=(who.name, who.password), json={"token_name": "short"})
    assert r.status_code == 200, r.text
    long_ago = (datetime.now(UTC) - timedelta(days=40)).replace(tzinfo=None).isoformat(" ")
    db = sqlite3.connect(site.state_dir / "nagaya.db")
    with db:
        db.execute("UPDATE user_tokens SET expires_at = ? WHERE name = 'short' AND user_id = "
                   "(SELECT id FROM users WHERE name = ?)", (long_ago, who.name))
    try:
        dry = maintain(site, "--dry-run", "--no-gc")
        assert sorted(dry["job_logs"]["removed"]) == [str(d / "link"), str(old)] and old.exists()
        assert dry["tokens_pruned"] >= 1
        rep = maintain(site, "--no-gc")
        assert sorted(rep["job_logs"]["removed"]) == [str(d / "link"), str(old)]
        assert not old.exists() and fresh.exists() and elsewhere.exists()
        left = {n for (n,) in db.execute("SELECT t.name FROM user_tokens t JOIN users u ON u.id = t.user_id "
                                         "WHERE u.name = ?", (who.name,))}
        assert "short" not in left and left, left
        assert maintain(site, "--no-gc")["tokens_pruned"] == 0       # idempotent
        r = who.nagaya("project", "ls")                                # the live login token still works
        assert r.returncode == 0, r.stderr
    finally:
        db.close()
        shutil.rmtree(d, ignore_errors=True)
        elsewhere.unlink(missing_ok=True)
