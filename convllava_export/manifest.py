"""Reading a build's manifest: a leaf module, so `build` (which writes it) and the runtime,
server and CLI (which read it) share one definition without importing each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BuildError

SCHEMA_VERSION = 1


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise BuildError(f"{folder} is not a build folder (no manifest.json); create one with `convllava-export build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BuildError(f"{path}: schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; rebuild with this version of convllava-export")
    return manifest
