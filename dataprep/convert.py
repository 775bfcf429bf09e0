"""The conversion of one corpus into a dataset folder: plan, units of work, finalize.

Where the work runs is not decided here (see `jobs.convert`, which runs `run_unit` as Ray tasks).

Determinism: records are sorted by key and cut into units by count and estimated bytes, from the
inputs and parameters alone, so the shard layout never depends on the number of workers. A unit
writes one or more shards `shards/shard-UUUUUU-PP.tar` (a new part when the exact tar bytes would
pass `--shard-max-bytes`) and then a completion record `_work/units/UUUUUU.json` holding the shard
hashes, index rows and quarantine rows.

Resume: a unit is skipped only when its completion record matches the current plan digest AND every
shard it lists still hashes to the recorded sha256 (read back, not trusted from existence).
Finalize writes index, quarantine, dataset.json and, last, manifest.parquet, then removes `_work/`.

Disk full: a write that fails with ENOSPC/EDQUOT raises `DiskFullError`, naming the file and what to do;
the failed shard's temporary file is removed, so no partial shard ever holds a final name or the space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dataprep.converters.base import ConvertOptions, Converter, Plan, UpstreamRecord
from xsam.data.manifest import (
    DATASET,
    INDEX,
    INDEX_SCHEMA,
    LAYOUT_VERSION,
    MANIFEST,
    MANIFEST_SCHEMA,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    SHARDS_DIR,
    WORK_DIR,
    dataset_json_bytes,
    is_complete,
    parquet_bytes,
)
from dataprep.quarantine import InputError, QuarantineRow, Rejected
from dataprep.shard_writer import ShardEntry, canonical_json, tar_overhead, write_shard_file
from dataprep.shard_writer import sample_json as shard_sample_json
from xsam.data.storage import Storage
from xsam.data.render import RenderOptions, load_templates, render_record, text_chars, vocabulary_from_table
from xsam.data.schema import SCHEMA_VERSION, ShardSample

DEFAULT_SHARD_MAX_SAMPLES = 1000
DEFAULT_SHARD_MAX_BYTES = 1 << 30


@dataclass(kw_only=True, slots=True)
class ConvertParams:
    """Parameters of a conversion; all of them change the output and are recorded."""

    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES
    verify: str = "structural"
    max_pixels: int = ConvertOptions().max_pixels
    templates: str | None = None  # path of a templates YAML; None = the packaged one

    def __post_init__(self) -> None:
        if self.shard_max_samples < 1:
            raise ValueError(f"--shard-max-samples must be >= 1, got {self.shard_max_samples}")
        if self.shard_max_bytes < 64 * 1024:
            raise ValueError(f"--shard-max-bytes must be >= 65536, got {self.shard_max_bytes}")
        if self.verify not in ("structural", "full"):
            raise ValueError(f"--verify must be 'structural' or 'full', got {self.verify!r}")


@dataclass(kw_only=True, slots=True)
class Unit:
    index: int
    records: list[UpstreamRecord]


@dataclass(kw_only=True, slots=True)
class Prepared:
    """What the driver knows before any work runs."""

    converter: Converter
    plan: Plan
    params: ConvertParams
    parameters: dict[str, Any]  # as recorded in dataset.json
    digest: str  # of converter, parameters, inputs: identifies the output
    units: list[Unit]
    complete: bool = False  # the output already holds exactly this dataset


@dataclass(kw_only=True, slots=True)
class UnitResult:
    index: int
    shards: list[dict[str, Any]]
    index_rows: list[dict[str, Any]]
    quarantine_rows: list[dict[str, str]]
    records: int  # upstream records planned in this unit
    samples: int
    items: int
    reused: bool = False
    counts: dict[str, int] = field(default_factory=dict)


class DiskFullError(OSError):
    """A conversion write failed for lack of space (ENOSPC) or quota (EDQUOT): the message names the
    file and the fix. Finished shards stay valid; the same command resumes once space is freed."""


@contextmanager
def disk_full_is_fatal(storage: Storage, rel: str, local: Path | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT while writing `rel` (through the local file `local`, if any) into one
    `DiskFullError` that says which file, on which disk, and how to resume."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):  # (a DiskFullError has no errno: passes)
            raise
        through = err.filename or local
        disk = local.parent if local is not None and storage.local_path(rel) is None else storage.url
        raise DiskFullError(
            f"disk full: writing {storage.describe(rel)} failed ({err.strerror}"
            f"{f', local file {through}' if through else ''}). Free space (or raise the quota) on the disk "
            f"holding {disk}, or convert to another --out; then re-run the same command: finished shards are "
            "verified and reused, and no partial shard was kept"
        ) from err


def make_units(records: list[UpstreamRecord], params: ConvertParams) -> list[Unit]:
    """Cut key-sorted records into units by count and estimated bytes (inputs-only, so stable)."""
    units: list[Unit] = []
    current: list[UpstreamRecord] = []
    current_bytes = tar_overhead()
    for rec in records:
        full = len(current) >= params.shard_max_samples
        too_big = current and current_bytes + rec.est_bytes > params.shard_max_bytes
        if full or too_big:
            units.append(Unit(index=len(units), records=current))
            current, current_bytes = [], tar_overhead()
        current.append(rec)
        current_bytes += rec.est_bytes
    if current:
        units.append(Unit(index=len(units), records=current))
    return units


def _digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def prepare(converter: Converter, storage: Storage, params: ConvertParams, *, replace: bool = False) -> Prepared:
    """Plan the conversion and decide what the output folder already holds.

    A folder holding another dataset (or an unfinished conversion of other inputs) is refused, or,
    with `replace`, emptied first (a workflow re-running a conversion whose inputs changed)."""
    plan = converter.plan()
    templates = load_templates(params.templates)
    parameters = {
        "shard_max_samples": params.shard_max_samples,
        "shard_max_bytes": params.shard_max_bytes,
        "verify": params.verify,
        "max_pixels": params.max_pixels,
        "templates_sha256": templates.sha256,
        "render": {**asdict(RenderOptions()), "seed": 0, "epoch": 0},
        **converter.parameters(),
    }
    identity = {
        "layout_version": LAYOUT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "converter": {"name": converter.name, "version": converter.version},
        "parameters": parameters,
        "inputs": [asdict(i) for i in plan.inputs],
    }
    digest = _digest(identity)
    units = make_units(plan.records, params)
    prepared = Prepared(
        converter=converter, plan=plan, params=params, parameters=parameters, digest=digest, units=units
    )
    storage.cleanup_temporaries()  # what a killed writer left; never a finished file
    if is_complete(storage):
        meta = json.loads(storage.get_bytes(DATASET))
        if meta.get("digest") == digest:
            prepared.complete = True
            return prepared
        if not replace:
            raise InputError(
                f"{storage.url} already holds a different dataset (corpus {meta.get('corpus')}, "
                f"parameters {meta.get('parameters')}); write to another --out, delete that folder, or convert with --replace"
            )
        storage.delete_prefix("")  # --replace: the other dataset goes
    plan_rel = f"{WORK_DIR}/plan.json"
    if storage.exists(plan_rel):
        previous = json.loads(storage.get_bytes(plan_rel))
        if previous.get("digest") != digest:
            if not replace:
                raise InputError(
                    f"{storage.url} holds an unfinished conversion with other inputs or parameters "
                    f"({previous.get('identity', {}).get('parameters')}); re-run it with the same command, "
                    "or delete the folder to start over (or convert with --replace)"
                )
            storage.delete_prefix("")  # --replace: the other conversion's pieces go
    if not storage.exists(plan_rel):
        with disk_full_is_fatal(storage, plan_rel):
            storage.put_bytes(plan_rel, canonical_json({"digest": digest, "identity": identity, "units": len(units)}))
    return prepared


def run_unit(
    converter: Converter,
    unit: Unit,
    storage: Storage,
    params: ConvertParams,
    digest: str,
    categories: list[dict[str, Any]],
) -> UnitResult:
    """Convert one unit of records into its shard(s) and completion record (runs in a worker)."""
    unit_digest = _digest({"plan": digest, "unit": unit.index, "keys": [r.key for r in unit.records]})
    done_rel = f"{WORK_DIR}/units/{unit.index:06d}.json"
    if storage.exists(done_rel):
        done = json.loads(storage.get_bytes(done_rel))
        if done.get("digest") == unit_digest and all(
            storage.sha256(f"{SHARDS_DIR}/{s['name']}") == s["sha256"] for s in done["shards"]
        ):
            done.pop("digest")
            return UnitResult(**done, reused=True)

    options = ConvertOptions(verify=params.verify, max_pixels=params.max_pixels)
    templates = load_templates(params.templates)
    vocabulary = vocabulary_from_table(categories)
    entries: list[tuple[ShardEntry, dict[str, Any]]] = []
    quarantine: list[dict[str, str]] = []
    items_total = 0
    for up in unit.records:
        try:
            converted = converter.convert(up, options)
            items = render_record(converted.record, seed=0, epoch=0, templates=templates, vocabulary=vocabulary)
            sample_json = shard_sample_json(ShardSample(record=converted.record, items=items))
        except Rejected as err:
            quarantine.append(_record_row(converter, up, err.reason, err.message, source_file=err.source_file))
            continue
        except (KeyError, TypeError, ValueError, IndexError) as err:  # malformed upstream entry
            quarantine.append(_record_row(converter, up, "invalid_annotation", f"{type(err).__name__}: {err}"))
            continue
        quarantine.extend(row.to_dict() for row in converted.parts)
        record = converted.record
        image = record.image
        entry = ShardEntry(
            key=record.key, image_ext=image.ext if image else None,
            image=converted.image_bytes if image else None, sample_json=sample_json,
        )
        row = {
            "key": record.key,
            "shard": "",
            "task": record.task,
            "corpus": record.source.corpus,
            "split": record.source.split,
            "upstream_ids": canonical_json(record.source.upstream_ids).decode(),
            "image_sha256": image.sha256 if image else "",
            "sample_sha256": hashlib.sha256(sample_json).hexdigest(),
            "segments": len(record.segments),
            "items": len(items),
            "width": image.width if image else 0,
            "height": image.height if image else 0,
            "text_chars": text_chars(items),
        }
        items_total += len(items)
        entries.append((entry, row))

    # exact-size parts: a new shard when the next record's tar bytes would pass the byte limit
    parts: list[list[tuple[ShardEntry, dict[str, Any]]]] = []
    size = tar_overhead()
    for entry, row in entries:
        add = entry.tar_bytes()
        if not parts or (parts[-1] and size + add > params.shard_max_bytes):
            parts.append([])
            size = tar_overhead()
        parts[-1].append((entry, row))
        size += add

    shards = []
    for p, part in enumerate(parts):
        name = f"shard-{unit.index:06d}-{p:02d}.tar"
        rel = f"{SHARDS_DIR}/{name}"
        with disk_full_is_fatal(storage, rel):
            tmp = storage.scratch_dir() / f".{name}.{uuid.uuid4().hex}.partial"
        try:
            with disk_full_is_fatal(storage, rel, tmp):
                sha, nbytes = write_shard_file(tmp, [entry for entry, _ in part])
                storage.put_file(rel, tmp)  # consumes tmp: the final name appears only when complete
        finally:
            tmp.unlink(missing_ok=True)  # a failed write's partial file must not keep the space a re-run needs
        counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for _, row in part:
            row["shard"] = name
            counts[(row["task"], row["split"])][0] += 1
            counts[(row["task"], row["split"])][1] += row["items"]
        shards.append(
            {
                "name": name,
                "sha256": sha,
                "bytes": nbytes,
                "samples": len(part),
                "items": sum(row["items"] for _, row in part),
                "counts": [
                    {"task": t, "split": s, "records": c[0], "items": c[1]} for (t, s), c in sorted(counts.items())
                ],
            }
        )
    result = UnitResult(
        index=unit.index,
        shards=shards,
        index_rows=[row for _, row in entries],
        quarantine_rows=quarantine,
        records=len(unit.records),
        samples=len(entries),
        items=items_total,
    )
    # what `asdict(result)` minus "reused" holds (the values are plain JSON data already; asdict's
    # deep copy cost ~0.07 ms per record), so the completion record is byte-identical
    payload = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "reused"}
    with disk_full_is_fatal(storage, done_rel):
        storage.put_bytes(done_rel, canonical_json({**payload, "digest": unit_digest}))
    return result


def _record_row(converter: Converter, up: UpstreamRecord, reason: str, message: str, *,
                source_file: str | None = None) -> dict[str, str]:
    return QuarantineRow(
        level="record",
        source_file=source_file or up.image_name,
        record_id=up.record_id,
        part_id="",
        key=up.key,
        reason=reason,
        message=message,
    ).to_dict()


class AccountingError(RuntimeError):
    """records_read != samples + quarantined: a record was lost. Never expected; always fatal."""


def finalize(prepared: Prepared, storage: Storage, results: list[UnitResult]) -> dict[str, Any]:
    """Write index, quarantine, dataset.json, then manifest.parquet; remove `_work/`."""
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != [u.index for u in prepared.units]:
        raise RuntimeError("finalize called before every unit finished")
    plan = prepared.plan
    manifest_rows = [shard for r in results for shard in r.shards]
    index_rows = [row for r in results for row in r.index_rows]
    q_rows = [row.to_dict() for row in plan.quarantine] + [row for r in results for row in r.quarantine_rows]
    q_rows.sort(key=lambda q: (q["key"], q["record_id"], q["level"], q["part_id"], q["reason"], q["message"]))

    samples = len(index_rows)
    quarantined = sum(1 for q in q_rows if q["level"] == "record")
    quarantined_parts = sum(1 for q in q_rows if q["level"] == "part")
    records_read = plan.records_read
    if records_read != samples + quarantined:
        raise AccountingError(
            f"records_read {records_read} != samples {samples} + quarantined {quarantined}: a record was lost"
        )
    by_task: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for row in index_rows:
        cell = by_task[row["task"]].setdefault(row["split"], {"records": 0, "items": 0})
        cell["records"] += 1
        cell["items"] += row["items"]
    by_reason: dict[str, dict[str, int]] = {}
    for (reason, level), n in sorted(Counter((q["reason"], q["level"]) for q in q_rows).items()):
        by_reason.setdefault(reason, {"record": 0, "part": 0})[level] = n
    totals = {
        "records_read": records_read,
        "samples": samples,
        "quarantined": quarantined,
        "quarantined_parts": quarantined_parts,
        "items": sum(row["items"] for row in index_rows),
        "shards": len(manifest_rows),
        "bytes": sum(s["bytes"] for s in manifest_rows),
    }
    meta = {
        "layout_version": LAYOUT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "corpus": prepared.converter.name,
        "task": prepared.converter.task,
        "converter": {"name": prepared.converter.name, "version": prepared.converter.version},
        "splits": plan.splits,
        "parameters": prepared.parameters,
        "inputs": [asdict(i) for i in plan.inputs],
        "categories": plan.categories,
        "digest": prepared.digest,
        "totals": totals,
        "by_task": {t: dict(sorted(s.items())) for t, s in sorted(by_task.items())},
        "by_reason": by_reason,
    }
    for rel, data in (
        (INDEX, parquet_bytes(index_rows, INDEX_SCHEMA)),
        (QUARANTINE, parquet_bytes(q_rows, QUARANTINE_SCHEMA)),
        (DATASET, dataset_json_bytes(meta)),
        (MANIFEST, parquet_bytes(manifest_rows, MANIFEST_SCHEMA)),  # last: marks completion
    ):
        with disk_full_is_fatal(storage, rel):
            storage.put_bytes(rel, data)
    keep = {f"{SHARDS_DIR}/{s['name']}" for s in manifest_rows}
    for rel in storage.list(SHARDS_DIR):
        if rel not in keep:  # parts of an interrupted attempt under another layout
            storage.delete(rel)
    storage.delete_prefix(WORK_DIR)
    storage.cleanup_temporaries()
    return meta


def cleanup_complete(storage: Storage) -> None:
    """A finished dataset may still have `_work/` when killed right after the manifest: remove it."""
    if is_complete(storage) and storage.list(WORK_DIR):
        storage.delete_prefix(WORK_DIR)
    storage.cleanup_temporaries()
