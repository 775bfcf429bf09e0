"""What the benchmark scripts share: paths, the real-sample corpora, machine facts, the docs block.

Imported by `benchmarks/*.py` run as scripts (`benchmarks/` is then sys.path[0]). Public tools
only: /proc, `platform`, the project's own test builders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The checkout first. tests/ is NOT put on sys.path: its `xsam/` test folder would shadow the
# package as a namespace package; the builders are loaded from their file instead.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_SHARED = REPO.parent / "shared" / "corpora"
CORPORA = _SHARED if (_SHARED / "coco_panoptic").is_dir() else REPO / "examples" / "corpora"
DOCS = REPO / "docs" / "benchmarks.md"


def load_builders() -> Any:
    """`tests/builders.py` as a module (inputs built from the real samples)."""
    spec = importlib.util.spec_from_file_location("builders", REPO / "tests" / "builders.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def cpu_ticks() -> list[int] | None:
    """Machine-wide CPU ticks (user, nice, system, idle, iowait, ...) from /proc/stat, or None."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None


def busy_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of all CPU time the machine was busy between two `cpu_ticks` (this run and anything else)."""
    if not before or not after:
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal
    return (total - delta[3] - delta[4]) / total if total else None


def machine(**versions: str) -> dict[str, str]:
    """CPU count and model, Python and platform, plus the given library versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        **versions,
        "platform": platform.platform(),
    }


def write_block(begin: str, end: str, table: str, *, missing: str) -> None:
    """Replace the text between `begin` and `end` in docs/benchmarks.md (append `missing`, which
    must hold both markers, when the page lacks them)."""
    text = DOCS.read_text() if DOCS.exists() else ""
    if begin not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + missing
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def work_folder(out: str | None, tag: str) -> Path:
    """An empty work folder: `out` (only emptied when a previous run of this benchmark made it,
    marked by `.TAG`), else a new temporary folder."""
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    if root.exists() and any(root.iterdir()):
        if not (root / f".{tag}").exists():
            sys.exit(f"--out {root} exists and is not a folder this benchmark made; pass an empty or new folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / f".{tag}").touch()
    return root


def emit(table: str, result: dict[str, Any], json_path: str | None, write_docs: Any | None) -> None:
    """Print the results table; write every timing as JSON and replace the docs block on request."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if write_docs is not None:
        write_docs(table)
        print(f"\n(updated {DOCS.relative_to(REPO)})", file=sys.stderr)
