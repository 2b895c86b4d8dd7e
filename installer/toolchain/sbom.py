"""The wheelhouse's SBOM as a CycloneDX 1.6 JSON document, made with cyclonedx-python-lib (vendor side).

One component per wheel: name, version, package URL, SHA-256, the licence its metadata declares, and
two properties the installer reads back (`appliance:path` in the bundle, `appliance:tags`). A wheel
that two runtime variants share (wheels/cpu/, wheels/cuda/) is listed once per variant. The
manifest carries the document as its `sbom`; installer.bundle.manifest reads it with plain JSON, so the
site needs no SBOM library.
"""

from __future__ import annotations

import email.parser
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from appliance.errors import SpecError
from installer.bundle.manifest import WHEELS

WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<tags>[^-]+-[^-]+-[^-]+)\.whl$")
PATH_PROPERTY, TAGS_PROPERTY = "appliance:path", "appliance:tags"


def _licence(wheel: Path) -> str | None:
    """What the wheel's METADATA says: License-Expression (PEP 639), else a short License field, else
    the licence classifiers."""
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            return None
        meta = email.parser.Parser().parsestr(z.read(name).decode("utf-8", "replace"), headersonly=True)
    if meta.get("License-Expression"):
        return str(meta["License-Expression"]).strip()
    text = (meta.get("License") or "").strip()
    if text and len(text) <= 80 and "\n" not in text:
        return text
    classifiers = [c.rsplit("::", 1)[1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " OR ".join(classifiers) or None


def cyclonedx(root: Path, digests: dict[str, str], prefix: str = WHEELS) -> dict[str, Any]:
    """The SBOM of every wheel under `root/prefix` among the bundle's file digests."""
    from cyclonedx.contrib.license.factories import LicenseFactory
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    bom = Bom()
    licences = LicenseFactory()
    for path in sorted(p for p in digests if p.startswith(prefix) and p.endswith(".whl")):
        m = WHEEL_NAME.match(Path(path).name)  # wheels/<runtime>/<file>
        if not m:
            raise SpecError(f"{path} is not a valid wheel file name.")
        name, version = m["name"].replace("_", "-").lower(), m["version"]
        declared = _licence(root / path)
        bom.components.add(Component(
            type=ComponentType.LIBRARY, name=name, version=version, bom_ref=path,
            purl=PackageURL("pypi", name=name, version=version, qualifiers={"file_name": Path(path).name}),
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digests[path])],
            licenses=[licences.make_from_string(declared)] if declared else [],
            properties=[Property(name=PATH_PROPERTY, value=path), Property(name=TAGS_PROPERTY, value=m["tags"])],
        ))
    doc: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    return doc
