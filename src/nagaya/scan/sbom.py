"""SPDX 2.3 JSON documents of an image's installed packages (with package URLs, so other tools match them)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from nagaya import __version__
from nagaya.scan.inventory import Inventory, Package

MEDIA_TYPE = "application/spdx+json"


def purl(pkg: Package, distro: str) -> str:
    from urllib.parse import quote

    if pkg.type == "pypi":
        return f"pkg:pypi/{quote(pkg.name.lower().replace('_', '-'))}@{quote(pkg.version)}"
    namespace = distro.split(":", 1)[0].lower() or pkg.type
    q = [f"arch={pkg.arch}"] if pkg.arch else []
    if distro:
        q.append(f"distro={namespace}-{distro.split(':', 1)[1].lstrip('v')}")
    if pkg.source and pkg.source != pkg.name:
        q.append(f"upstream={quote(pkg.source)}")
    return f"pkg:{pkg.type}/{namespace}/{quote(pkg.name)}@{quote(pkg.version)}" + ("?" + "&".join(q) if q else "")


def _spdx_id(i: int, pkg: Package) -> str:
    return f"SPDXRef-Package-{pkg.type}-{re.sub(r'[^A-Za-z0-9.-]', '-', pkg.name)}-{i}"


def spdx(inv: Inventory, image_name: str, digest: str) -> dict[str, Any]:
    root = "SPDXRef-Image"
    packages: list[dict[str, Any]] = [{
        "SPDXID": root, "name": image_name or digest, "versionInfo": digest, "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "SHA256", "checksumValue": digest.split(":", 1)[-1]}],
    }]
    rels = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": root}]
    for i, p in enumerate(inv.packages):
        sid = _spdx_id(i, p)
        packages.append({
            "SPDXID": sid, "name": p.name, "versionInfo": p.version, "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False, "licenseDeclared": "NOASSERTION", "supplier": "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(p, inv.distro)}],
            **({"sourceInfo": f"built from source package {p.source} {p.source_version}"}
               if p.type == "deb" and p.source else {}),
        })
        rels.append({"spdxElementId": root, "relationshipType": "CONTAINS", "relatedSpdxElement": sid})
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name or 'image'}@{digest}",
        "documentNamespace": f"https://nagaya.invalid/spdx/{digest.replace(':', '-')}/{uuid.uuid4()}",
        "creationInfo": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "creators": [f"Tool: nagaya-{__version__}"]},
        "packages": packages, "relationships": rels,
    }
