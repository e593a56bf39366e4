"""Service and check definition files, as Consul reads them from its config directory:
`{"service": {...}}`, `{"services": [...]}`, `{"check": {...}}`, `{"checks": [...]}`, in JSON
or TOML. Used by --config-dir (loaded at start and on SIGHUP) and `meshnode services register`."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DefinitionError", "Definitions", "load_dir", "load_file"]

SUFFIXES = (".json", ".toml")


class DefinitionError(ValueError):
    """A definition file that cannot be used; the message names the file."""


@dataclass
class Definitions:
    services: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)


def load_file(path: Path, into: Definitions | None = None) -> Definitions:
    out = into if into is not None else Definitions()
    try:
        raw = path.read_bytes().decode("utf-8")
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DefinitionError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: expected an object with service(s) or check(s)")
    for key, value in data.items():
        k = key.lower()
        items = [value] if k in ("service", "check") else value
        if k not in ("service", "services", "check", "checks") or not isinstance(items, list):
            raise DefinitionError(f"{path}: unknown or malformed key {key!r}")
        for item in items:
            if not isinstance(item, dict):
                raise DefinitionError(f"{path}: {key} entries must be objects")
            (out.services if k.startswith("service") else out.checks).append(item)
    return out


def load_dir(directory: Path) -> Definitions:
    if not directory.is_dir():
        raise DefinitionError(f"{directory}: not a directory")
    out = Definitions()
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in SUFFIXES and path.is_file():
            load_file(path, out)
    return out
