"""What to type to add an optional extra, for the way this copy of batchcls was installed.

``pip install 'batchcls[parquet]'`` is right only for a copy that came from a package index. A wheel installed
from a file is not on any index (that name would find nothing, or someone else's project), so it gets the
packages themselves; a checkout installed with ``pip install -e`` gets its own extra back. pip records which of
these it did in the distribution's ``direct_url.json`` (PEP 610).
"""
from __future__ import annotations

import json
from importlib import metadata
from urllib.parse import unquote, urlparse


def install_hint(extra: str, packages: str) -> str:
    """The command that adds ``extra`` (whose code imports ``packages``, space-separated) to this install."""
    # The first copy an installer put on the path; a checkout's build leftovers (batchcls.egg-info) don't count.
    installed = [d for d in metadata.distributions(name="batchcls") if d.read_text("INSTALLER")]
    if not installed:  # imported from a source tree that was never installed
        return f"pip install {packages}"
    direct = _direct_url(installed[0])
    if direct is None:  # no record: installed from an index, where the extra exists
        return f"pip install 'batchcls[{extra}]'"
    url = urlparse(str(direct.get("url", "")))
    if (direct.get("dir_info") or {}).get("editable") and url.scheme == "file":
        return f"pip install -e '{unquote(url.path)}[{extra}]'"
    return f"pip install {packages}"  # a wheel or folder installed by path: not on any index under this name


def _direct_url(dist: metadata.Distribution) -> dict | None:
    try:
        record = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
