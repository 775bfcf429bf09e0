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
import threading
import time
from pathlib import Path
from typing import Any

# Set before any benchmark imports ray or transformers: a single-machine Ray binds to loopback (read
# when ray is imported) and reports no usage stats; nothing reaches the hub; tokenizers start no
# thread pool of their own next to the loader's workers.
for _name, _value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                      ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
# The checkout first. tests/ is NOT put on sys.path: its `xsam/` test folder would shadow the
# package as a namespace package; the builders are loaded from their file instead.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_SHARED = REPO.parent / "shared" / "corpora"
CORPORA = _SHARED if (_SHARED / "coco_panoptic").is_dir() else REPO / "examples" / "corpora"
# The page the --write-docs blocks go to, its plots beside it in images/. XSAM_BENCH_DOCS points both
# elsewhere (a trial run that must not replace the published numbers); the page is copied there first.
PUBLISHED_DOCS = REPO / "docs" / "benchmarks.md"
DOCS = Path(os.environ.get("XSAM_BENCH_DOCS") or PUBLISHED_DOCS).resolve()
IMAGES = DOCS.parent / "images"
# The opening of every results block: what its numbers are and are not.
ONE_RUN = ("Ratios measured in one run: every ratio is against a floor measured on the same machine in the same "
           "run; absolute rates are this machine's, under whatever else ran on it.")


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


def machine_title(m: dict[str, str]) -> str:
    """The machine in a plot title: CPUs and model, and what the numbers are."""
    return f"{m['nproc']} CPUs ({m['cpu']}), one run"


def write_block(begin: str, end: str, table: str, *, missing: str) -> None:
    """Replace the text between `begin` and `end` in docs/benchmarks.md (append `missing`, which
    must hold both markers, when the page lacks them)."""
    if not DOCS.exists() and DOCS != PUBLISHED_DOCS and PUBLISHED_DOCS.exists():
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PUBLISHED_DOCS, DOCS)
    text = DOCS.read_text() if DOCS.exists() else ""
    if begin not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + missing
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def shown(path: Path) -> str:
    """PATH relative to the checkout when inside it (messages, help texts)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def quick_note(quick: bool) -> str:
    """A sentence for the results block of a --quick run (reduced sizes: a check that the script runs)."""
    return (" **Quick mode (`--quick`): reduced sizes to check that the benchmark runs; not numbers to compare.**"
            if quick else "")


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
        print(f"\n(updated {shown(DOCS)})", file=sys.stderr)


_TICKS = os.sysconf("SC_CLK_TCK")


def tree_ticks() -> dict[tuple[int, str], int]:
    """{(pid, start time): user + system ticks} of this process and all its descendants: Ray's GCS and
    raylet, the workers the raylet starts, the training workers' loader processes."""
    stats: dict[int, tuple[int, str, int]] = {}  # pid -> (parent, start time, ticks)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "(comm)", counted from state = 0: ppid 1, utime 11, stime 12, starttime 19
        stats[int(name)] = (int(fields[1]), fields[19], int(fields[11]) + int(fields[12]))
    tree, frontier = {os.getpid()}, {os.getpid()}
    while frontier:
        frontier = {p for p, (parent, _, _) in stats.items() if parent in frontier and p not in tree}
        tree |= frontier
    return {(p, stats[p][1]): stats[p][2] for p in tree if p in stats}


class Window(threading.Thread):
    """Wall time, machine-wide busy cores and this process tree's cores between start and stop.

    The tree is sampled every `period` s and each process's own ticks are summed from when it was
    first seen (from its ticks at the start, for the processes already running then). Reaped
    children's `cutime` cannot be used: the raylet lets its exited workers be reaped without
    collecting their times (it ignores SIGCHLD). A process that exits loses at most its last
    `period` s of CPU."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self._halt = period, threading.Event()
        self.base = tree_ticks()
        self.last = dict(self.base)
        self.t0, self.machine0, self.load0 = time.perf_counter(), cpu_ticks(), loadavg()
        self.start()

    def run(self) -> None:
        while not self._halt.wait(self.period):
            self.last.update(tree_ticks())

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join()
        self.last.update(tree_ticks())
        wall = time.perf_counter() - self.t0
        busy = busy_share(self.machine0, cpu_ticks())
        own = sum(t - self.base.get(key, 0) for key, t in self.last.items()) / _TICKS / wall
        machine = None if busy is None else busy * (os.cpu_count() or 1)
        return {"wall_s": wall, "own_cores": own, "machine_cores": machine,
                "others_cores": None if machine is None else max(0.0, machine - own),
                "load_start": self.load0, "load_end": loadavg()}
