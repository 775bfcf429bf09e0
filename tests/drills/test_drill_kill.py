"""Fault drill: the conversion job SIGKILLed at seeded random points, then the same command again.

Issue 9: "Conversion killed with SIGKILL at 20 random points (seeded; 3 points in the default run, 20
under `slow`) -> re-run gives byte-identical output every time", asserting nothing is lost or duplicated.

A point is one or two kills drawn from one seeded RNG (`XSAM_DRILL_SEED`, default `DEFAULT_SEED`);
every third point kills the re-run too. A kill is (event, delay): SIGKILL the `xsam data convert`
driver process `delay` seconds after `event` is first seen on disk. The events cover the whole run,
by phase: start-up (process started: imports, planning; plan written: Ray connect, workers), units
(each of the 12 shards published, each unit's completion record written) and finalize (last unit
done: the driver leaves Ray; index written: finalize under way; manifest written: `_work/` going,
run log and summary to come). A draw picks a phase (units weigh 3, the others 1), an event in it,
and a delay up to about the time until the next event, so the kills land in every phase.

The default run checks points 0-2, `slow` points 3-19: a full run (CI runs `slow` too) checks 20. A
failure names the seed, the point, its kills and what was on disk after each; replay one with
`XSAM_DRILL_SEED=S pytest tests/drills/test_drill_kill.py -k pNN`. After the kills the same command
runs to the end in the test process (saves an interpreter start and a Ray connect per point).

The driver is killed, not the Ray workers it started (losing those is the node-loss drill): a unit
already running may still publish its shard after the kill, which the re-run must verify, not trust.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from builders import build_panoptic, dataset_files
from conftest import invoke_cli

from xsam.data.manifest import INDEX, MANIFEST, read_parquet
from xsam.data.storage import open_storage

DEFAULT_SEED = 11  # its first 3 points: mid-units, mid-units, and a kill of the re-run mid-units
SEED = int(os.environ.get("XSAM_DRILL_SEED", DEFAULT_SEED))
RECORDS = 12  # one shard per record (--shard-max-samples 1): 12 units, 12 shards
DEFAULT_POINTS = 3
ALL_POINTS = 20
OPTIONS = ("--shard-max-samples", "1", "--num-workers", "1")


def _phases() -> dict[str, list[tuple[str, float]]]:
    """The run's events by phase, in order, each with its longest delay in seconds: about the time
    until the next event on a 2-core box."""
    units = [(f"{what} {k}", 0.03) for k in range(1, RECORDS + 1) for what in ("shard", "unit")]
    return {
        # imports and planning; then connecting to Ray and starting workers
        "startup": [("start", 3.0), ("plan", 2.0)],
        "units": units,
        # after the last unit the driver leaves Ray, then writes index, quarantine, dataset.json and the
        # manifest; then `_work/` goes, the run log and the summary are written
        "finalize": [(f"unit {RECORDS}", 1.2), ("index", 0.03), ("manifest", 0.8)],
    }


PHASES = _phases()
PHASE_WEIGHTS = {"startup": 1, "units": 3, "finalize": 1}  # the units phase holds most on-disk states


@dataclass(frozen=True, slots=True)
class Kill:
    event: str
    delay: float  # seconds after `event` is first seen

    def __str__(self) -> str:
        return f"{self.event.replace(' ', '')}+{self.delay:.3f}s"


def draw_points(seed: int, n: int) -> list[tuple[Kill, ...]]:
    """`n` kill points from one seeded RNG: a phase (weighted), an event in it, a delay; every third
    point also kills the re-run."""
    rng = random.Random(seed)

    def draw() -> Kill:
        phase = rng.choices(list(PHASE_WEIGHTS), weights=list(PHASE_WEIGHTS.values()))[0]
        event, longest = rng.choice(PHASES[phase])
        return Kill(event, round(rng.uniform(0, longest), 3))

    return [tuple(draw() for _ in range(2 if i % 3 == 2 else 1)) for i in range(n)]


POINTS = draw_points(SEED, ALL_POINTS)


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _reached(event: str, out: Path) -> bool:
    finished = (out / MANIFEST).exists()  # `_work/` (plan, unit records) is removed after it
    what, _, k = event.partition(" ")
    if what == "start":
        return True
    if what == "plan":
        return finished or (out / "_work" / "plan.json").exists()
    if what == "shard":
        return _count(out / "shards", "*.tar") >= int(k)
    if what == "unit":
        return finished or _count(out / "_work" / "units", "*.json") >= int(k)
    if what == "index":
        return (out / INDEX).exists()
    if what == "manifest":
        return finished
    raise ValueError(f"unknown event {event!r}")


def _disk_state(out: Path) -> str:
    return (
        f"plan={(out / '_work' / 'plan.json').exists():d} shards={_count(out / 'shards', '*.tar')} "
        f"units={_count(out / '_work' / 'units', '*.json')} index={(out / INDEX).exists():d} "
        f"manifest={(out / MANIFEST).exists():d} _work={(out / '_work').exists():d}"
    )


def _settle(out: Path, quiet: float = 0.3, timeout: float = 60) -> None:
    """Wait until nothing under `out` changes for `quiet` s: a unit that was running when its driver
    died may still publish, until Ray stops the dead job's workers; the next run starts after that."""
    def listing() -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_size) for p in out.rglob("*") if p.is_file()) if out.exists() else []

    deadline = time.monotonic() + timeout
    last, since = listing(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            now = listing()
        except FileNotFoundError:  # a file went while listing
            now = None
        if now != last:
            last, since = now, time.monotonic()


def _argv(out: Path, inputs: dict[str, Path], address: str) -> list[str]:
    argv = [str(Path(sys.executable).parent / "xsam"), "data", "convert", "coco-panoptic", "--out", str(out)]
    for name, path in inputs.items():
        argv += [f"--{name}", str(path)]
    return [*argv, *OPTIONS, "--address", address]


def _kill_at(argv: list[str], out: Path, kill: Kill, timeout: float = 180) -> str:
    """Run the command and SIGKILL it `kill.delay` s after `kill.event` is seen on disk; returns what
    was on disk then (or that the run finished first, which the point records)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _reached(kill.event, out):
            if proc.poll() is not None:
                return f"{kill}: finished (exit {proc.returncode}) before the event; {_disk_state(out)}"
            if time.monotonic() > deadline:
                raise AssertionError(f"{kill}: event not reached in {timeout}s; {_disk_state(out)}")
            time.sleep(0.002)
        fire = time.monotonic() + kill.delay
        while time.monotonic() < fire:
            if proc.poll() is not None:
                return f"{kill}: finished (exit {proc.returncode}) within the delay; {_disk_state(out)}"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _settle(out)
        return f"{kill}: killed; {_disk_state(out)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def panoptic12(tmp_path_factory, corpora) -> dict[str, Path]:
    return build_panoptic(corpora, tmp_path_factory.mktemp("pan12") / "coco", RECORDS)


@pytest.fixture(scope="module")
def panoptic_reference(ray_session, panoptic12, tmp_path_factory) -> Path:
    """The same conversion, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    invoke_cli(*_argv(out, panoptic12, ray_session)[1:])  # in this process, on the session's Ray
    return out


def _drill(n: int, address: str, inputs: dict[str, Path], reference: Path, out: Path) -> None:
    argv = _argv(out, inputs, address)
    seen = [_kill_at(argv, out, kill) for kill in POINTS[n]]
    context = (
        f"seed {SEED}, point p{n:02d} ({' then '.join(map(str, POINTS[n]))}); on disk after each kill: "
        f"{' | '.join(seen)}; replay: XSAM_DRILL_SEED={SEED} pytest {Path(__file__).name} -k p{n:02d}"
    )
    # the same command once more, to the end: in this process (no interpreter start-up or Ray connect
    # to pay again), which holds no state of the killed runs
    try:
        rerun = invoke_cli(*argv[1:], check=False)
    except Exception as err:
        raise AssertionError(f"{context}\nre-run raised {err!r}") from err
    assert rerun.returncode == 0, f"{context}\nre-run exit {rerun.returncode}:\n{rerun.stderr[-3000:]}"

    got, want = dataset_files(out), dataset_files(reference)
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert not extra and not missing, f"{context}\nextra files {extra}, missing files {missing}"
    assert not (out / "_work").exists(), context
    # nothing lost or duplicated: every key exactly once, every shard exactly once, the same counts
    keys = [row["key"] for row in read_parquet(open_storage(out), INDEX)]
    ref_keys = [row["key"] for row in read_parquet(open_storage(reference), INDEX)]
    assert len(keys) == len(set(keys)) == RECORDS and keys == ref_keys, f"{context}\nindex keys {keys}"
    manifest = read_parquet(open_storage(out), MANIFEST)
    names = [r["name"] for r in manifest]
    assert names == [r["name"] for r in read_parquet(open_storage(reference), MANIFEST)], f"{context}\n{names}"
    assert sum(r["samples"] for r in manifest) == RECORDS, context
    totals = json.loads(got["dataset.json"])["totals"]
    assert totals == json.loads(want["dataset.json"])["totals"], context
    assert [name for name in want if got[name] != want[name]] == [], f"{context}\nthese files differ in bytes"


def _ids(points: range) -> list[str]:
    return [f"p{n:02d}-" + "-then-".join(map(str, POINTS[n])) for n in points]


def test_draw_is_seeded_and_spread():
    """The points replay from the seed alone, the default ones are the sweep's first, and the 20
    reach every phase: start-up, units, finalize, and a killed re-run."""
    assert draw_points(SEED, ALL_POINTS) == POINTS and draw_points(SEED, DEFAULT_POINTS) == POINTS[:DEFAULT_POINTS]
    assert any(len(p) == 2 for p in POINTS[:DEFAULT_POINTS])
    if SEED == DEFAULT_SEED:  # another seed may draw fewer phases; the default one must cover them all
        events = {kill.event.split()[0] for point in POINTS for kill in point}
        assert {"start", "plan", "shard", "unit"} <= events and events & {"index", "manifest"}, events


@pytest.mark.parametrize("n", range(DEFAULT_POINTS), ids=_ids(range(DEFAULT_POINTS)))
def test_sigkill_then_rerun_is_byte_identical(n, ray_session, panoptic12, panoptic_reference, tmp_path):
    _drill(n, ray_session, panoptic12, panoptic_reference, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("n", range(DEFAULT_POINTS, ALL_POINTS), ids=_ids(range(DEFAULT_POINTS, ALL_POINTS)))
def test_sigkill_sweep(n, ray_session, panoptic12, panoptic_reference, tmp_path):
    _drill(n, ray_session, panoptic12, panoptic_reference, tmp_path / "out")
