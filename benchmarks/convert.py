"""Conversion throughput as a ratio to the floor of copying the same image bytes into tar files.

    .venv/bin/python benchmarks/convert.py [--records N] [--repeats R] [--out DIR] [--write-docs]

What runs, all in one process and one run, so that every number is compared with a floor measured
on the same (possibly noisy, shared) machine seconds apart (see docs/benchmarks.md):

- inputs, built from the real samples in the corpora folder (never invented annotations):
  * `instances-jpeg` (N = --records, 600): COCO instances over the real COCO val2017 JPEG
    000000439180 (640x360, 198 KB) with its 32 real RLE annotations (`coco_instances/annotations/
    panoptic_coco_detection_format.json`), replicated under image ids 1..N
    (`tests/builders.py::build_instances(sample="rle")`);
  * `panoptic` (--panoptic-records, 200): `tests/builders.py::build_panoptic` (the same JPEG + its
    real panoptic PNG); fewer records by default only because it converts ~5x slower;
- floors, over the same image files and the same shard grouping (`dataprep.convert.make_units`):
  * `plain copy`: one process reads every file and writes its bytes into tar files;
  * `Ray copy`: the same read+tar+write as Ray tasks, one task per unit, on the same Ray with the same
    number of workers as the conversion, so the only difference to `convert` is the conversion work;
- `convert`: `jobs.convert.run_conversion` (planning, Ray tasks, finalize) into a fresh folder, with
  the default validation (`structural`) and with `--verify full`;
- CPU time (`--cpu-units`, 1): `dataprep.convert.run_unit` on the first unit(s) in this process, no
  Ray, against the plain copy of the same unit(s), both by `time.process_time`: a per-core rate that
  does not count time spent waiting for a CPU (it still feels cache and SMT contention).

Ray is started once per worker count (`num_cpus=W`, loopback only) and warmed up (worker processes
started, modules imported) before anything is timed: start-up is excluded from every timing alike.
Per repeat the measured configurations alternate (Ray copy, convert structural, Ray copy, convert
full); each conversion's ratio is taken against the copy that ran just before it, and the tables
report medians over the repeats (samples/s medians, median of the per-pair ratios). Planning
(`prepare`) and `finalize` are inside every conversion timing and also reported on their own.

`--profile` instead prints a cProfile of `run_unit` on one unit per corpus and validation mode.

Only `time.perf_counter`/`time.process_time`, the project's own code and Ray are used. Nothing is
asserted on timings: the script reports, and says whether the issue's targets were met.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (CORPORA, DOCS, ONE_RUN, busy_share, cpu_ticks, emit, load_builders, loadavg, quick_note,
                    shown, work_folder, write_block)
from common import machine as machine_facts


BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"

TARGET_RATIO = 0.5  # of the Ray copy floor, default validation
TARGET_PER_CORE = 300.0  # samples/s per worker, default validation, COCO-size images
# --quick: the flags left at their defaults become these (a check that the benchmark runs, in ~1 minute)
QUICK = {"records": 100, "panoptic_records": 40, "repeats": 1, "shard_samples": 50}


# ---- inputs -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str  # row label
    corpus: str  # converter name
    records: int
    inputs: dict[str, str]
    warm_inputs: dict[str, str]
    groups: list[list[Path]] = field(default_factory=list)  # image files per unit, as planned
    image_bytes: int = 0


def build_cases(root: Path, sizes: dict[str, int], corpora: Path) -> list[Case]:
    """The corpora named in `sizes` (name -> records), plus an 8-record warm-up copy of each."""
    builders = load_builders()
    makers = {
        "instances-jpeg": ("coco-instances", lambda c, o, n: builders.build_instances(c, o, n, sample="rle")),
        "panoptic": ("coco-panoptic", builders.build_panoptic),
    }
    cases = []
    for name, n in sizes.items():
        corpus, make = makers[name]
        inputs = make(corpora, root / name, n)
        warm = make(corpora, root / f"{name}-warmup", 8)
        cases.append(
            Case(
                name=name,
                corpus=corpus,
                records=n,
                inputs={k: str(v) for k, v in inputs.items()},
                warm_inputs={k: str(v) for k, v in warm.items()},
            )
        )
    return cases


def plan(case: Case, params: Any, out: Path) -> Any:
    """`prepare` (as a conversion does) into OUT; fills the case's per-unit image files."""
    from dataprep.convert import prepare
    from dataprep.converters import get_converter
    from xsam.data.storage import open_storage

    shutil.rmtree(out, ignore_errors=True)
    prepared = prepare(get_converter(case.corpus)(**case.inputs), open_storage(str(out)), params)
    images = Path(case.inputs["images"])
    case.groups = [[images / r.image_name for r in unit.records] for unit in prepared.units]
    case.image_bytes = sum(p.stat().st_size for g in case.groups for p in g)
    return prepared


# ---- the copy floor ---------------------------------------------------------------------------


def copy_unit(paths: list[str], dest: str) -> int:
    """Read each file and write its bytes into one tar (deterministic headers, like the shards)."""
    with open(dest, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in paths:
            with open(path, "rb") as src:
                data = src.read()
            info = tarfile.TarInfo(os.path.basename(path))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return len(paths)


def plain_copy(case: Case, out: Path) -> int:
    out.mkdir(parents=True)
    return sum(
        copy_unit([str(p) for p in g], str(out / f"shard-{u:06d}-00.tar")) for u, g in enumerate(case.groups)
    )


def ray_copy(case: Case, out: Path, remote: Any) -> int:
    import ray

    out.mkdir(parents=True)
    refs = [
        remote.remote([str(p) for p in g], str(out / f"shard-{u:06d}-00.tar")) for u, g in enumerate(case.groups)
    ]
    return sum(ray.get(refs))


# ---- the conversion ---------------------------------------------------------------------------


PHASES: dict[str, float] = {}


def _install_phase_timers() -> None:
    """Time `prepare` (planning) and `finalize` inside `run_conversion`, by wrapping the names its
    module calls; behaviour is unchanged. Skipped (phases reported as "-") if the names change."""
    import jobs.convert as job

    for name in ("prepare", "finalize"):
        fn = getattr(job, name, None)
        if fn is None or getattr(fn, "_bench_timed", False):
            continue

        def wrapper(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                PHASES[_name] = time.perf_counter() - t0

        wrapper._bench_timed = True  # type: ignore[attr-defined]
        setattr(job, name, wrapper)


def convert(case: Case, out: Path, params: Any, workers: int, inputs: dict[str, str] | None = None) -> dict:
    from rich.console import Console

    from jobs.convert import run_conversion

    PHASES.clear()
    outcome = run_conversion(
        case.corpus, str(out), dict(inputs or case.inputs), params, num_workers=workers, console=Console(quiet=True)
    )
    return outcome.meta["totals"]


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    records: int
    workers: int  # 0: in-process, CPU time (no Ray)
    verify: str
    convert_s: list[float] = field(default_factory=list)
    copy_s: list[float] = field(default_factory=list)  # the copy paired with (run just before) each conversion
    plan_s: list[float] = field(default_factory=list)  # inside each conversion
    finalize_s: list[float] = field(default_factory=list)
    bound_s: list[float] = field(default_factory=list)  # the mandated-work bound (CPU-time rows only)


def machine() -> dict[str, str]:
    import pyarrow
    import ray

    return machine_facts(ray=ray.__version__, pyarrow=pyarrow.__version__)


def bound_unit(case: Case, unit: Any, dest: str, verify: str) -> int:
    """The copy of one unit plus only the per-record work that the issue itself requires of ANY
    converter, done the cheapest way: a lower bound on a conversion's cost.

    Per record: read the image (and, for panoptic, its mask PNG), sha256 each, the structural check
    of each (`imagecheck.inspect_image`: markers through EOI, chunk CRCs; `--verify full` also
    decodes the image), then
    - instances: pycocotools area + bbox of the record's upstream RLEs (with `--verify full` also
      their run check) and one JSON member holding them (no schema, no rendering, no categories,
      no index row);
    - panoptic: decode the PNG (masks cannot be made without it), nothing more;
    and one fsync of the shard (atomic write). No planning, no completion record, no finalize.
    Everything `run_unit` does beyond this is left out, so bound / copy is an upper limit on what
    convert / copy can reach with this machine's hashing, checking and decoding speed."""
    from pycocotools import mask as coco_mask

    from dataprep.imagecheck import decode_png_array, inspect_image
    from xsam.data.masks import counts_problems

    images = Path(case.inputs["images"])
    masks = Path(case.inputs["masks"]) if "masks" in case.inputs else None
    with open(dest, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for up in unit.records:
            members = []
            with open(images / up.image_name, "rb") as src:
                data = src.read()
            hashlib.sha256(data).hexdigest()
            inspect_image(data, verify=verify)  # type: ignore[arg-type]
            members.append((up.image_name, data))
            if masks is not None:
                with open(masks / up.payload["annotation"]["file_name"], "rb") as src:
                    png = src.read()
                hashlib.sha256(png).hexdigest()
                inspect_image(png)
                decode_png_array(png)
            else:
                segs = [a["segmentation"] for a in up.payload["annotations"]]
                rles = [{"size": s["size"], "counts": s["counts"].encode("ascii")} for s in segs]
                coco_mask.area(rles)
                coco_mask.toBbox(rles)
                if verify == "full":  # full also checks that every upstream RLE's runs cover its mask
                    h, w = segs[0]["size"] if segs else (0, 0)
                    counts_problems([s["counts"] for s in segs], h * w)
                members.append((f"{up.key}.json", json.dumps({"segments": segs}).encode()))
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(blob))
        tar.close()
        f.flush()
        os.fsync(f.fileno())
    return len(unit.records)


def cpu_pass(
    case: Case, prepared: Any, units: int, scratch: Path, verify: str
) -> tuple[float, float, float, int]:
    """In this process, no Ray: CPU seconds (`time.process_time`) of the plain copy of the first
    UNITS units, of the mandated-work bound (`bound_unit`) and of `run_unit` on the same units.
    Returns (copy CPU s, convert CPU s, bound CPU s, records)."""
    from dataprep.convert import run_unit
    from xsam.data.storage import open_storage

    chosen = prepared.units[:units]
    records = sum(len(u.records) for u in chosen)
    out = scratch / "cpu-copy"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.process_time()
    for unit, group in zip(chosen, case.groups):
        copy_unit([str(p) for p in group], str(out / f"shard-{unit.index:06d}-00.tar"))
    copy_cpu = time.process_time() - t0
    shutil.rmtree(out)
    out = scratch / "cpu-bound"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.process_time()
    bound_records = sum(
        bound_unit(case, unit, str(out / f"shard-{unit.index:06d}-00.tar"), verify) for unit in chosen
    )
    bound_cpu = time.process_time() - t0
    shutil.rmtree(out)
    if bound_records != records:
        raise RuntimeError(f"{case.name}: the bound covered {bound_records} of {records} records")
    out = scratch / "cpu-convert"
    shutil.rmtree(out, ignore_errors=True)
    storage = open_storage(str(out))
    t0 = time.process_time()
    samples = 0
    for unit in chosen:
        result = run_unit(
            prepared.converter, unit, storage, prepared.params, prepared.digest, prepared.plan.categories
        )
        samples += result.samples
    convert_cpu = time.process_time() - t0
    shutil.rmtree(out)
    if samples != records:
        raise RuntimeError(f"{case.name}: {samples} samples from {records} records")
    return copy_cpu, convert_cpu, bound_cpu, records


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = work_folder(args.out, "xsam-bench")
    try:
        return _run(args, root)
    finally:
        # the default temporary folder goes entirely; a given --out keeps its inputs for a look
        shutil.rmtree(root if args.out is None else root / "runs", ignore_errors=True)


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import ray

    from dataprep.convert import ConvertParams

    runs = root / "runs"
    started = time.perf_counter()
    load_start, ticks_start = loadavg(), cpu_ticks()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)

    _install_phase_timers()
    verifies = ("structural", "full")
    params = {v: ConvertParams(shard_max_samples=args.shard_samples, verify=v) for v in verifies}
    warm_params = {v: ConvertParams(shard_max_samples=2, verify=v) for v in verifies}
    cases = build_cases(root / "inputs", args.sizes, CORPORA)
    scratch = root / "scratch"
    prepared = {(c.name, v): plan(c, params[v], scratch / f"plan-{c.name}-{v}") for c in cases for v in verifies}
    log(f"inputs built in {time.perf_counter() - started:.1f} s")
    rows: dict[tuple[str, int, str], Row] = {}

    def row_for(case: Case, workers: int, verify: str) -> Row:
        return rows.setdefault((case.name, workers, verify), Row(case.name, case.records, workers, verify))

    # 1. in-process CPU time (no Ray): robust to other load on a shared machine
    if args.cpu_units:
        for case in cases:  # warm-up: imports, caches
            for verify in verifies:
                cpu_pass(case, prepared[(case.name, verify)], 1, scratch, verify)
        for r in range(args.repeats):
            for case in cases:
                for verify in verifies:
                    copy_cpu, convert_cpu, bound_cpu, n = cpu_pass(
                        case, prepared[(case.name, verify)], args.cpu_units, scratch, verify
                    )
                    row = row_for(case, 0, verify)
                    row.records = n
                    row.copy_s.append(copy_cpu)
                    row.convert_s.append(convert_cpu)
                    row.bound_s.append(bound_cpu)
                    log(f"  repeat {r + 1}/{args.repeats} {case.name} in-process CPU {verify}: "
                        f"copy {n / copy_cpu:,.0f}/CPU-s bound {n / bound_cpu:,.0f}/CPU-s "
                        f"convert {n / convert_cpu:,.0f}/CPU-s")

    # 2. wall clock, Ray, W workers
    plain_s: dict[str, list[float]] = {c.name: [] for c in cases}
    counter = 0

    def fresh(tag: str) -> Path:
        nonlocal counter
        counter += 1
        return runs / f"{counter:04d}-{tag}"

    for workers in args.workers:
        t_ray = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            remote = ray.remote(num_cpus=1, max_retries=3)(copy_unit)
            # warm-up (untimed): worker processes up, modules imported, for the copy and every conversion
            for case in cases:
                ray_copy(case, fresh("warm-copy"), remote)
                for verify in verifies:
                    convert(case, fresh("warm-convert"), warm_params[verify], workers, case.warm_inputs)
            shutil.rmtree(runs, ignore_errors=True)
            log(f"Ray with {workers} CPU(s) started and warmed up in {time.perf_counter() - t_ray:.1f} s")
            for r in range(args.repeats):
                for case in cases:
                    out = fresh("plain")
                    seconds, n = timed(plain_copy, case, out)
                    assert n == case.records, (n, case.records)
                    plain_s[case.name].append(seconds)
                    shutil.rmtree(out)
                    for verify in verifies:
                        row = row_for(case, workers, verify)
                        out = fresh("copy")
                        copy_seconds, n = timed(ray_copy, case, out, remote)
                        assert n == case.records, (n, case.records)
                        shutil.rmtree(out)
                        out = fresh("convert")
                        seconds, totals = timed(convert, case, out, params[verify], workers)
                        if totals["samples"] != case.records or totals["quarantined"]:
                            raise RuntimeError(f"{case.name}: unexpected totals {totals}")
                        shutil.rmtree(out)
                        row.copy_s.append(copy_seconds)
                        row.convert_s.append(seconds)
                        if "prepare" in PHASES and "finalize" in PHASES:
                            row.plan_s.append(PHASES["prepare"])
                            row.finalize_s.append(PHASES["finalize"])
                        log(f"  repeat {r + 1}/{args.repeats} {case.name} W={workers} {verify}: "
                            f"copy {case.records / copy_seconds:,.0f}/s convert {case.records / seconds:,.0f}/s")
        finally:
            ray.shutdown()
    result = {
        "args": {
            "records": args.records,
            "panoptic_records": args.panoptic_records,
            "repeats": args.repeats,
            "shard_samples": args.shard_samples,
            "cpu_units": args.cpu_units,
            "workers": args.workers,
            "quick": args.quick,
        },
        "machine": machine(),
        "cases": {
            c.name: {
                "corpus": c.corpus,
                "records": c.records,
                "units": len(c.groups),
                "image_mb": c.image_bytes / 1e6,
                "plain_copy_sps": (
                    statistics.median(c.records / s for s in plain_s[c.name]) if plain_s[c.name] else None
                ),
            }
            for c in cases
        },
        "rows": [summarize(row) for row in rows.values()],
        "total_s": time.perf_counter() - started,
        "load": {"start": load_start, "end": loadavg(), "busy": busy_share(ticks_start, cpu_ticks())},
    }
    return result


def summarize(row: Row) -> dict[str, Any]:
    n = row.records
    ratios = [c / s for c, s in zip(row.copy_s, row.convert_s)]
    convert_sps = statistics.median(n / s for s in row.convert_s)
    return {
        "case": row.case,
        "records": n,
        "workers": row.workers,
        "verify": row.verify,
        "convert_sps": convert_sps,
        "per_core_sps": convert_sps / max(row.workers, 1),
        "copy_sps": statistics.median(n / s for s in row.copy_s),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "plan_s": statistics.median(row.plan_s) if row.plan_s else None,
        "finalize_s": statistics.median(row.finalize_s) if row.finalize_s else None,
        "convert_median_s": statistics.median(row.convert_s),
        "bound_sps": statistics.median(n / s for s in row.bound_s) if row.bound_s else None,
        "bound_ratio": statistics.median(c / b for c, b in zip(row.copy_s, row.bound_s)) if row.bound_s else None,
        "bound_s": row.bound_s,
        "convert_s": row.convert_s,
        "copy_s": row.copy_s,
    }


# ---- report -----------------------------------------------------------------------------------


def targets_met(row: dict[str, Any]) -> bool:
    return row["ratio"] >= TARGET_RATIO and row["per_core_sps"] >= TARGET_PER_CORE


def markdown(result: dict[str, Any]) -> str:
    a, m, busy = result["args"], result["machine"], result["load"]["busy"]
    sizes = ", ".join(f"{name} {c['records']}" for name, c in result["cases"].items())
    lines = [
        f"{ONE_RUN}{quick_note(a.get('quick', False))}",
        "",
        f"Run: `--records {a['records']} --panoptic-records {a['panoptic_records']} --repeats {a['repeats']} "
        f"--shard-samples {a['shard_samples']} --cpu-units {a['cpu_units']}` (records: {sizes}; workers "
        f"{', '.join(map(str, a['workers']))}); {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"Ray {m['ray']}, pyarrow {m['pyarrow']}; whole run {result['total_s']:.0f} s; load average "
        f"{result['load']['start']} at the start, {result['load']['end']} at the end"
        + (f", CPUs {100 * busy:.0f}% busy during the run." if busy is not None else "."),
        "",
        "Wall clock, Ray (`run_conversion` vs the Ray copy floor, same workers, same shard grouping):",
        "",
        "| corpus | workers | verify | convert samples/s | per core | Ray copy samples/s | convert / copy "
        "(min-max) | plan + finalize s / run s | targets (>= 0.5 and >= 300/core) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        if row["workers"] == 0:
            continue
        target = ("met" if targets_met(row) else "NOT met") if row["verify"] == "structural" else "-"
        phases = (
            f"{row['plan_s']:.2f} + {row['finalize_s']:.2f} / {row['convert_median_s']:.1f}"
            if row["plan_s"] is not None
            else f"- / {row['convert_median_s']:.1f}"
        )
        lines.append(
            f"| {row['case']} | {row['workers']} | {row['verify']} | {row['convert_sps']:,.0f} | "
            f"{row['per_core_sps']:,.0f} | {row['copy_sps']:,.0f} | {row['ratio']:.3f} "
            f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | {phases} | {target} |"
        )
    cpu_rows = [row for row in result["rows"] if row["workers"] == 0]
    if cpu_rows:
        lines += [
            "",
            "CPU time, one process, no Ray (`run_unit` vs the plain copy of the same units, by "
            "`time.process_time`: time spent waiting for a CPU is not counted). *Bound* is the copy plus only "
            "the per-record work the issue requires of any converter (sha256 and structural check of every "
            "file read, the RLE area/bbox and one JSON member, the panoptic PNG decode, one fsync per shard; "
            "`bound_unit` in the script): bound / copy is the most that convert / copy can reach here.",
            "",
            "| corpus | records | verify | convert samples/CPU-s | bound samples/CPU-s | copy samples/CPU-s "
            "| convert / copy (min-max) | bound / copy | ms per record (convert) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in cpu_rows:
            bound_sps = f"{row['bound_sps']:,.0f}" if row.get("bound_sps") else "-"
            bound_ratio = f"{row['bound_ratio']:.3f}" if row.get("bound_ratio") else "-"
            lines.append(
                f"| {row['case']} | {row['records']} | {row['verify']} | {row['convert_sps']:,.0f} | {bound_sps} | "
                f"{row['copy_sps']:,.0f} | {row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | "
                f"{bound_ratio} | {1000 / row['convert_sps']:.1f} |"
            )
    lines += [
        "",
        "| corpus | records | units (= shards) | image MB | plain copy samples/s (1 process, no Ray) "
        "| plain copy MB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in result["cases"].items():
        if c["plain_copy_sps"] is None:
            continue
        mbps = c["plain_copy_sps"] * c["image_mb"] / c["records"]
        lines.append(
            f"| {name} | {c['records']} | {c['units']} | {c['image_mb']:.0f} | {c['plain_copy_sps']:,.0f} "
            f"| {mbps:,.0f} |"
        )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    write_block(BEGIN, END, table, missing=f"# Benchmarks\n\n{BEGIN}\n{END}\n")


def profile(args: argparse.Namespace) -> None:
    """cProfile of `run_unit` on one unit, in this process (no Ray), for every case and verify mode."""
    from dataprep.convert import ConvertParams, run_unit
    from xsam.data.storage import open_storage

    root = Path(tempfile.mkdtemp(prefix="xsam-bench-profile-"))
    try:
        sizes = {name: args.shard_samples for name in args.sizes}
        for case in build_cases(root / "inputs", sizes, CORPORA):
            for verify in ("structural", "full"):
                params = ConvertParams(shard_max_samples=args.shard_samples, verify=verify)
                prepared = plan(case, params, root / f"out-{case.name}-{verify}")
                unit = prepared.units[0]
                # one unprofiled pass first: imports and caches are not what is measured
                run_unit(prepared.converter, unit, open_storage(str(root / "warm")), params, prepared.digest,
                         prepared.plan.categories)
                profiler = cProfile.Profile()
                storage = open_storage(str(root / f"out-{case.name}-{verify}"))
                t0 = time.perf_counter()
                profiler.runcall(
                    run_unit, prepared.converter, unit, storage, params, prepared.digest, prepared.plan.categories
                )
                seconds = time.perf_counter() - t0
                print(f"\n## {case.name} verify={verify}: one unit of {len(unit.records)} records, "
                      f"{len(unit.records) / seconds:,.0f} samples/s under the profiler\n")
                stream = io.StringIO()
                stats = pstats.Stats(profiler, stream=stream).strip_dirs()
                stats.sort_stats("cumulative").print_stats(args.profile_top)
                stats.sort_stats("tottime").print_stats(args.profile_top)
                print(stream.getvalue())
                shutil.rmtree(root / "warm", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=600, help="records of the instances-jpeg corpus (600)")
    parser.add_argument(
        "--panoptic-records", type=int, default=200,
        help="records of the panoptic corpus (200: its conversion is ~5x slower; 600 keeps it at --records)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternated copy/convert repeats (3)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument(
        "--shard-samples", type=int, default=100, help="--shard-max-samples = records per unit and per Ray task (100)"
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (1,2)")
    parser.add_argument("--cases", default="instances-jpeg,panoptic", help="instances-jpeg, panoptic (both)")
    parser.add_argument(
        "--cpu-units", type=int, default=1, help="units per in-process CPU-time pass; 0 skips that table (1)"
    )
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes, a check that it runs: the flags left at their defaults become "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--write-docs", action="store_true", help=f"update the results in {shown(DOCS)}")
    parser.add_argument("--json", default=None, help="also write the raw results (every timing) to this file")
    parser.add_argument("--profile", action="store_true", help="instead: cProfile run_unit on one unit per case")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed per profile (25)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each measurement to stderr")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers: expected comma-separated integers, got {args.workers!r}")
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - {"instances-jpeg", "panoptic"})
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: instances-jpeg, panoptic")
    counts = [args.records, args.panoptic_records, args.repeats, args.shard_samples, *args.workers]
    if min(counts) < 1 or args.cpu_units < 0:
        parser.error("--records, --panoptic-records, --repeats, --shard-samples, --workers must be >= 1")
    args.sizes = {name: args.panoptic_records if name == "panoptic" else args.records for name in names}
    if args.profile:
        profile(args)
        return 0
    result = run(args)
    emit(markdown(result), result, args.json, write_docs if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
