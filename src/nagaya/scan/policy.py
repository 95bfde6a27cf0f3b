"""The slow half of the vulnerability policy (nagaya.trust.gate holds the cached half): scan the image about to
run against the site's database and refuse it when a finding is at or above the rule's severity and not
excepted by the admin."""

from __future__ import annotations

from typing import Any

from nagaya.errors import NagayaError, PolicyRefused
from nagaya.scan import match, report
from nagaya.scan.vulndb import RANK, VulnDB


def check(cfg: Any, index: int, rule: dict[str, Any], digest: str, shown: str, ctx: str, cache_path: str) -> None:
    label = f"rule {index + 1} (scope {rule['scope']!r} blocks findings at or above {rule['severity']})"

    def refuse(why: str) -> PolicyRefused:
        return PolicyRefused(f"{shown}: refused by the site's vulnerability policy, {label}: {why}")

    try:
        inv = report.local_inventory(cfg, digest)
        with VulnDB(cfg.image.vulndb) as db:
            findings = match.scan(inv, db)
    except NagayaError as e:
        raise refuse(f"cannot scan it ({e.message})") from None
    allowed = frozenset(str(x) for x in [*(rule.get("except") or []), *cfg.image.vuln_allow])
    bad = [f for f in findings if RANK[f.severity] >= RANK[rule["severity"]] and f.id not in allowed]
    if bad:
        w = match.worst(bad)
        assert w is not None
        fix = f", fixed in {w.fixed}" if w.fixed else ", no fix yet"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise refuse(f"{w.id} ({w.severity}) in {w.package} {w.installed}{fix}{more}")
    from nagaya.trust.policy import _remember

    _remember(cache_path, ctx, {"digest": digest, "rule": index + 1, "findings": len(findings)})
