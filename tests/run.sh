#!/usr/bin/env bash
# The whole test suite. Run as root: the tests create unprivileged users and run every user-facing
# command as one of them; integration fixtures start the real daemons (registry, server, PostgreSQL,
# slapd) on loopback and stop them. Extra arguments go to pytest (e.g. -k run, -m "not integration").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=/opt/nagaya/bin/python
[ -x "$PY" ] || { echo "tests/run.sh: nagaya is not installed: run  bash deploy/install.sh  first" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "tests/run.sh: run as root (the tests create unprivileged test users)" >&2; exit 2; }
# These machines ship /dev/fuse and /dev/net/tun as 0600; normal systems have 0666 (DESIGN.md).
chmod 0666 /dev/fuse /dev/net/tun 2>/dev/null || true
mkdir -p test-output
"$PY" -m pytest tests -p no:cacheprovider -ra --junitxml=test-output/junit.xml "$@"
rc=$?
"$PY" - <<'PY'
import xml.etree.ElementTree as ET
try:
    root = ET.parse("test-output/junit.xml").getroot()
except (OSError, ET.ParseError):
    raise SystemExit(0)
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"nagaya tests: {passed} passed, {tot['failures'] + tot['errors']} failed, {tot['skipped']} skipped")
PY
# pytest's 5 means no test ran: that is a failure here, never a pass.
[ "$rc" = 5 ] && rc=1
exit "$rc"
