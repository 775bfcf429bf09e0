"""Reading the YAML files users write (mixtures, model configs): `yaml.safe_load` only, and pydantic
validation errors listed one key per line ("unknown key" spelled out), with the file named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def format_validation(exc: ValidationError) -> str:
    """One `  dotted.key: reason` line per error."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path, *, error: type[Exception], what: str) -> Any:
    """The parsed document of `path` (never executes anything in it); `error` names the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} {path}: not valid YAML: {exc}") from None
