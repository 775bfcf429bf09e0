"""The conversion job: `dataprep.convert` units run as Ray tasks, with progress and a summary.

Three ways to run, by `--address`:
- none: an embedded local Ray (or the Ray this process is already connected to; inside a submitted
  Ray job, `RAY_ADDRESS` makes `ray.init()` join the cluster);
- `HOST:PORT` / `ray://...`: this process becomes a driver of that cluster;
- `http(s)://HOST:DASHBOARD_PORT`: the command is submitted as a Ray Job (`xsam data convert ...`
  without `--address`) and its logs are followed here; inputs must be readable on the cluster and
  the output should be shared storage (`s3://...`).

The driver only plans and finalizes; workers read inputs and write shards straight to the output
storage, so a multi-node conversion needs no shared disk when the output is on S3.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dataprep.convert import (
    ConvertParams,
    DiskFullError,
    Prepared,
    UnitResult,
    cleanup_complete,
    finalize,
    prepare,
    run_unit,
)
from dataprep.converters import get_converter
from xsam.data.manifest import DATASET, LOGS_DIR
from dataprep.shard_writer import canonical_json
from jobs.submit import init_ray
from xsam.data.storage import Storage, open_storage


@dataclass(kw_only=True, slots=True)
class ConvertOutcome:
    meta: dict[str, Any]
    already_complete: bool
    reused_units: int
    converted_units: int
    seconds: float


def _remote_run_unit(converter, unit, storage, params, digest, categories) -> UnitResult:  # noqa: ANN001
    return run_unit(converter, unit, storage, params, digest, categories)


def run_conversion(
    corpus: str,
    out: str,
    inputs: dict[str, Any],
    params: ConvertParams,
    *,
    num_workers: int | None = None,
    address: str | None = None,
    console: Console | None = None,
    replace: bool = False,
) -> ConvertOutcome:
    """Convert CORPUS into OUT with Ray tasks; resumable and idempotent (see `dataprep.convert`).
    `replace`: a folder holding another dataset is emptied first instead of refused."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        # the embedded Ray is single-machine: bind it to loopback, not the host's address
        # (Ray reads this when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    console = console or Console(stderr=True)
    start = time.monotonic()
    num_workers = num_workers or os.cpu_count() or 1
    storage = open_storage(out)
    converter = get_converter(corpus)(**inputs)
    console.print(f"[bold]{corpus}[/]: planning from the annotations ...")
    prepared = prepare(converter, storage, params, replace=replace)
    if prepared.complete:
        cleanup_complete(storage)
        import json

        meta = json.loads(storage.get_bytes(DATASET))
        console.print(
            f"[green]nothing to do[/]: {storage.url} already holds this dataset "
            f"({meta['totals']['samples']} samples, {meta['totals']['shards']} shards); "
            "`xsam data lint` re-verifies it"
        )
        return ConvertOutcome(meta=meta, already_complete=True, reused_units=0, converted_units=0, seconds=0.0)

    started = init_ray(address, num_cpus=num_workers)
    try:
        results = _run_units(prepared, storage, num_workers, console)
    finally:
        if started:
            ray.shutdown()
    meta = finalize(prepared, storage, results)
    seconds = time.monotonic() - start
    reused = sum(r.reused for r in results)
    outcome = ConvertOutcome(
        meta=meta, already_complete=False, reused_units=reused, converted_units=len(results) - reused, seconds=seconds
    )
    _write_log(storage, outcome, num_workers)
    print_summary(console, storage, outcome)
    return outcome


def _run_units(prepared: Prepared, storage: Storage, num_workers: int, console: Console) -> list[UnitResult]:
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3)(_remote_run_unit)
    converter_ref = ray.put(prepared.converter)
    categories_ref = ray.put(prepared.plan.categories)
    pending = list(prepared.units)
    total_records = sum(len(u.records) for u in prepared.units)
    inflight: dict[Any, int] = {}
    results: list[UnitResult] = []
    samples = 0
    t0 = time.monotonic()
    progress = Progress(
        TextColumn("[bold]converting[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        TextColumn("{task.fields[rate]} samples/s"),
        TextColumn("{task.fields[units]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        bar = progress.add_task("convert", total=total_records, rate="-", units=f"0/{len(prepared.units)} units")
        while pending or inflight:
            while pending and len(inflight) < 2 * num_workers:
                unit = pending.pop(0)
                ref = remote.remote(converter_ref, unit, storage, prepared.params, prepared.digest, categories_ref)
                inflight[ref] = unit.index
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    if not isinstance(err.cause, DiskFullError):
                        raise
                    for other in inflight:  # they would fail the same way; stop them writing
                        ray.cancel(other)
                    raise err.cause from None  # one clear message, not a worker traceback
                results.append(result)
                samples += result.samples
                rate = samples / max(time.monotonic() - t0, 1e-6)
                progress.update(
                    bar,
                    advance=result.records,
                    rate=f"{rate:,.0f}",
                    units=f"{len(results)}/{len(prepared.units)} units",
                )
    return results


def _write_log(storage: Storage, outcome: ConvertOutcome, num_workers: int) -> None:
    """Run log (timestamps and worker counts belong here, never in the dataset files)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    entry = {
        "finished_utc": stamp,
        "seconds": round(outcome.seconds, 3),
        "num_workers": num_workers,
        "reused_units": outcome.reused_units,
        "converted_units": outcome.converted_units,
        "totals": outcome.meta["totals"],
    }
    storage.put_bytes(f"{LOGS_DIR}/convert-{stamp}-{os.getpid()}.json", canonical_json(entry) + b"\n")


def print_summary(console: Console, storage: Storage, outcome: ConvertOutcome) -> None:
    meta = outcome.meta
    totals = meta["totals"]
    table = Table(title=f"{meta['corpus']} -> {storage.url}", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in ("records_read", "samples", "quarantined", "quarantined_parts", "items", "shards", "bytes"):
        table.add_row(name, f"{totals[name]:,}")
    for reason, levels in meta["by_reason"].items():
        table.add_row(f"  quarantine: {reason}", f"{levels['record']:,} records, {levels['part']:,} parts")
    table.add_row("units converted / reused", f"{outcome.converted_units} / {outcome.reused_units}")
    rate = totals["samples"] / outcome.seconds if outcome.seconds else 0.0
    table.add_row("seconds (samples/s)", f"{outcome.seconds:,.1f} ({rate:,.1f})")
    console.print(table)
    ok = totals["records_read"] == totals["samples"] + totals["quarantined"]
    console.print(
        f"records_read {totals['records_read']} == samples {totals['samples']} + quarantined "
        f"{totals['quarantined']}: [{'green' if ok else 'red'}]{'ok' if ok else 'MISMATCH'}[/]"
    )
    console.print(f"dataset written to {storage.url} (inspect: xsam data info {storage.url})")


def submit_job(address: str, argv: list[str], console: Console | None = None) -> int:
    """Submit `xsam data convert ARGV` as a Ray Job at a dashboard address and follow its logs."""
    from jobs.submit import submit

    return submit(address, ["data", "convert", *argv], console)
