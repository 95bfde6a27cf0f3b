"""Vulnerability scanning and SBOMs: an offline vulnerability database (vulndb), version order per ecosystem
(versions), what an image has installed (inventory), which advisories apply (match), SPDX documents (sbom)."""
