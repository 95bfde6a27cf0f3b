"""The site policy's rule matching and cached verdicts (gate.py), without a registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nagaya.errors import UsageError
from nagaya.trust import gate

RULES = [
    {"scope": "*", "allow": "unsigned"},
    {"scope": "reg.example:5000/climate", "require": "signed", "keys": ["/etc/nagaya/keys/site.pub", "project"]},
    {"scope": "reg.example:5000/climate/scratch", "allow": "unsigned"},
    {"scope": "reg.example:5000", "require": "signed", "keys": ["/etc/nagaya/keys/site.pub"]},
]


@pytest.mark.parametrize(("name", "rule"), [
    ("reg.example:5000/climate/model", 2), ("reg.example:5000/climate", 2), ("reg.example:5000/climatex/a", 4),
    ("reg.example:5000/climate/scratch/a", 3), ("reg.example:5000/other/a", 4), ("other.org/x/y", 1), ("", 1),
])
def test_longest_scope_wins(name: str, rule: int) -> None:
    m = gate.match(RULES, name)
    assert m is not None and m[0] + 1 == rule


def test_no_rule_no_requirement() -> None:
    assert gate.match([{"scope": "reg/x", "allow": "unsigned"}], "reg/y/z") is None


@pytest.mark.parametrize("bad", [
    {"allow": "unsigned"}, {"scope": "a"}, {"scope": "a", "require": "signed"},
    {"scope": "a", "require": "signed", "keys": ["relative.pub"]}, {"scope": "a", "allow": "yes"},
    {"scope": "a", "allow": "unsigned", "require": "signed", "keys": ["project"]}, "scope=a",
])
def test_invalid_rules_are_named(bad: object) -> None:
    with pytest.raises(UsageError, match="policy rule 2"):
        gate.match([RULES[0], bad], "x")


def test_cached_verdict_follows_keys(tmp_path: Path) -> None:
    key = tmp_path / "site.pub"
    key.write_text("k1")
    rule = {"scope": "*", "require": "signed", "keys": [str(key), "project"]}
    cfg = SimpleNamespace(image=SimpleNamespace(keys_dir=str(tmp_path), policy=[rule], shared_cache_dirs=[]),
                          cache_root=str(tmp_path / "cache"))
    d = "sha256:" + "a" * 64
    ctx = gate.context(cfg, 0, rule, "reg.example/p/x", d)
    assert ctx == gate.context(cfg, 0, rule, "reg.example/p/x", d)
    assert ctx != gate.context(cfg, 0, rule, "reg.example/q/x", d)
    assert ctx != gate.context(cfg, 0, rule, "reg.example/p/x", "sha256:" + "b" * 64)
    (tmp_path / "projects" / "p").mkdir(parents=True)
    (tmp_path / "projects" / "p" / "lab.pub").write_text("k")
    assert gate.context(cfg, 0, rule, "reg.example/p/x", d) != ctx          # a project key added
    ctx2 = gate.context(cfg, 0, rule, "reg.example/p/x", d)
    key.write_text("k2 changed")
    assert gate.context(cfg, 0, rule, "reg.example/p/x", d) != ctx2         # the site key replaced
    # a verdict recorded for the current context admits without verifying
    (tmp_path / "cache" / "trust").mkdir(parents=True)
    (tmp_path / "cache" / "trust" / d[7:]).write_text(gate.context(cfg, 0, rule, "reg.example/p/x", d) + "\n{}\n")
    gate.admit(cfg, "reg.example/p/x:1", d)


def test_gate_is_lean() -> None:
    """The cached path imports nothing heavy: checked in a fresh interpreter."""
    code = ("import sys; import nagaya.trust.gate; "
            "print(sorted(m for m in ('json', 'pathlib', 'typing', 'hashlib', 'cryptography', 'httpx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_start_is_off_where_a_site_policy_applies() -> None:
    """A lazily read image runs its squashfs artifact, which nobody signed or scanned: `covers` names the
    rule that makes `nagaya run --pull lazy` pull in full instead."""
    from nagaya.trust import gate

    signed = {"scope": "reg:5000/lab", "require": "signed", "keys": ["project"]}
    unsigned = {"scope": "*", "allow": "unsigned"}
    vulns = {"scope": "reg:5000/sci", "severity": "high"}
    cfg = SimpleNamespace(image=SimpleNamespace(policy=[unsigned, signed], vuln_block=[vulns]))
    assert gate.covers(cfg, "reg:5000/lab/x") == "the site's signing policy (rule 2)"
    assert gate.covers(cfg, "reg:5000/sci/y") == "the site's vulnerability policy (rule 1)"
    assert gate.covers(cfg, "reg:5000/other/z") == ""
    assert gate.covers(SimpleNamespace(image=SimpleNamespace(policy=[], vuln_block=[])), "reg:5000/lab/x") == ""
