"""`xsam data lint`: re-read a whole dataset and check every byte against its metadata.

Nothing is trusted: every shard is streamed once (through `Storage`, so `s3://` datasets work the
same as local folders) and checked against `manifest.parquet`, every sample against its own record
and against `index.parquet`, and the totals of `dataset.json` against all of them:

- shards: the set of `shards/*` files equals the manifest's names; each file's sha256 and byte
  size equal the manifest's; the tar is readable and holds regular, flat members only;
- members: every name is `KEY.ext` with a valid record key, exactly one image (`jpg`|`png`) and one
  `json` per key, the members of a key are contiguous, keys are in order and unique in the dataset;
- samples: `KEY.json` validates as `ShardSample`, `record.key == KEY`, the items belong to the record
  (key, index, task, segment/phrase/prompt references in range), the record's schema version is
  the dataset's; every mask (segments, ignore, visual prompts) is a well-formed RLE whose runs cover
  exactly the image's height x width pixels (with `verify="full"` it is also decoded);
- images: the bytes' sha256, size and extension equal `record.image`, and they pass
  `inspect_image` (structural by default, `verify="full"` also decodes) with the recorded size;
- index: one row per sample, same keys, shard names, `sample_sha256` (of the json member), image
  sha256 and per-record facts (task, corpus, split, upstream ids, counts, size);
- manifest: per-shard samples/items/per task-split counts equal what the shard holds;
- dataset.json: `records_read == samples + quarantined`, `samples == index rows`, and the other
  totals agree with the manifest, the index and `quarantine.parquet`.

Each problem names the file (a shard, `index.parquet`, ...) and, where there is one, the sample key.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal

from pydantic import ValidationError

from dataprep.imagecheck import DEFAULT_MAX_PIXELS, ImageRejected, inspect_image
from xsam.data.manifest import (
    DATASET,
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    MANIFEST_SCHEMA,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    SHARDS_DIR,
    WORK_DIR,
    read_parquet_table,
)
from dataprep.shard_writer import canonical_json
from xsam.data.storage import CHUNK, Storage
from xsam.data import masks
from xsam.data.schema import KEY_PATTERN, RLE, ShardSample
from xsam.data.render import text_chars

IMAGE_EXTS = ("jpg", "png")
MEMBER_EXTS = (*IMAGE_EXTS, "json")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar$")


# --------------------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that does not hold. `where` is the dataset-relative file it was found in."""

    check: str  # short code, e.g. "shard_sha256", "sample_json", "index_missing"
    where: str  # "shards/shard-000000-00.tar", "index.parquet", "dataset.json", ...
    message: str
    key: str | None = None  # the sample key, when the problem is about one sample

    def render(self) -> str:
        place = f"shard {self.where}" if self.where.startswith(f"{SHARDS_DIR}/") else self.where
        sample = f", sample {self.key}" if self.key else ""
        return f"Error in {place}{sample}: {self.message}"


@dataclass(kw_only=True, slots=True)
class LintReport:
    """What `lint_dataset` checked and every problem it found (`ok` when there is none)."""

    path: str
    verify: str
    version: str | None = None
    shards: int = 0  # shard files read
    samples: int = 0  # samples (keys) read from the shards
    items: int = 0  # items of the samples that validated
    masks: int = 0  # masks checked
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verify": self.verify,
            "version": self.version,
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "items": self.items,
            "masks": self.masks,
            "problems": [asdict(p) for p in self.problems],
        }


# -------------------------------------------------------------------------------- shard reading


class _HashingReader:
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        self.digest.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member: its name and, for a regular file, its bytes (None otherwise)."""

    name: str
    data: bytes | None
    kind: str  # "file" or a word for what else it is


def iter_members(stream: BinaryIO) -> Iterator[Member]:
    """Stream a tar's members in file order without keeping more than one member in memory.

    Unlike `shard_writer.iter_shard`, nothing is refused or merged here: non-regular members and
    repeated names are yielded as they are, so that the caller can report them.
    """
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if info.isreg():
                fileobj = tar.extractfile(info)
                yield Member(name=info.name, data=fileobj.read() if fileobj is not None else b"", kind="file")
            else:
                kind = "directory" if info.isdir() else "link" if (info.issym() or info.islnk()) else "special file"
                yield Member(name=info.name, data=None, kind=kind)


def group_by_key(members: Iterator[Member]) -> Iterator[tuple[str, list[Member]]]:
    """Consecutive members sharing the part of their name before the first '.' (WebDataset rule)."""
    key: str | None = None
    group: list[Member] = []
    for member in members:
        k = member.name.partition(".")[0]
        if group and k != key:
            yield key, group  # type: ignore[misc]
            group = []
        key = k
        group.append(member)
    if group:
        yield key, group  # type: ignore[misc]


# ------------------------------------------------------------------------------------ masks


def check_rle(rle: RLE, height: int, width: int, *, decode: bool = False) -> str | None:
    """None when `rle` is a well-formed mask of exactly (height, width); else what is wrong.

    The run arithmetic alone proves the mask decodes to (height, width); `decode=True` (lint's
    `verify="full"`) also decodes it with pycocotools, as a reader would.
    """
    if tuple(rle.size) != (height, width):
        return f"size {list(rle.size)} != image [h, w] [{height}, {width}]"
    problem = masks.counts_problems([rle.counts], height * width)[0]
    if problem is not None:
        return f"malformed RLE counts: {problem} ({height} x {width})"
    if not decode:
        return None
    try:
        decoded = masks.decode(rle)
    except Exception as err:  # pycocotools raises ValueError on corrupt strings
        return f"RLE does not decode: {err}"
    if decoded.shape != (height, width):
        return f"decodes to {list(decoded.shape)} instead of [{height}, {width}]"
    return None


# ------------------------------------------------------------------------------------ samples


@dataclass(slots=True)
class _Found:
    """What lint read for one sample: compared against its index row afterwards."""

    shard: str
    sample_sha256: str | None
    image_sha256: str | None
    facts: dict[str, Any] | None  # index columns derived from a valid record, else None
    items: int | None
    task_split: tuple[str, str] | None


class _Linter:
    def __init__(self, storage: Storage, verify: str, max_pixels: int, report: LintReport) -> None:
        self.storage = storage
        self.verify = verify
        self.max_pixels = max_pixels
        self.report = report
        self.schema_version: str | None = None
        self.found: dict[str, _Found] = {}
        self.unreadable: set[str] = set()  # shard names whose tar could not be read to the end

    def problem(self, check: str, where: str, message: str, key: str | None = None) -> None:
        self.report.problems.append(Problem(check=check, where=where, message=message, key=key))

    # -- metadata ------------------------------------------------------------------------------

    def read_table(self, rel: str, schema) -> list[dict[str, Any]] | None:
        if not self.storage.exists(rel):
            self.problem("missing_file", rel, f"{self.storage.describe(rel)} does not exist")
            return None
        try:
            table = read_parquet_table(self.storage.get_bytes(rel))
        except Exception as err:
            self.problem("unreadable_file", rel, f"not a readable parquet file: {type(err).__name__}: {err}")
            return None
        missing = [name for name in schema.names if name not in table.schema.names]
        if missing:
            self.problem("file_schema", rel, f"lacks the column(s) {', '.join(missing)}")
            return None
        extra = [name for name in table.schema.names if name not in schema.names]
        if extra:
            self.problem("file_schema", rel, f"has unexpected column(s) {', '.join(extra)}")
        return table.select(schema.names).to_pylist()

    def read_meta(self) -> dict[str, Any] | None:
        if not self.storage.exists(DATASET):
            self.problem("missing_file", DATASET, f"{self.storage.describe(DATASET)} does not exist")
            return None
        try:
            meta = json.loads(self.storage.get_bytes(DATASET))
        except ValueError as err:
            self.problem("unreadable_file", DATASET, f"not valid JSON: {err}")
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("totals"), dict):
            self.problem("dataset_json", DATASET, "has no `totals` object")
            return None
        self.schema_version = meta.get("schema_version")
        return meta

    # -- shards --------------------------------------------------------------------------------

    def lint_shard(self, row: dict[str, Any]) -> None:
        name = row["name"]
        rel = f"{SHARDS_DIR}/{name}"
        size = self.storage.size(rel)
        if size is None:
            self.problem("shard_missing", rel, "listed in manifest.parquet but the file does not exist")
            self.unreadable.add(name)
            return
        self.report.shards += 1
        keys: list[str] = []
        seen: set[str] = set()
        items = 0
        items_known = True
        counts: Counter[tuple[str, str]] = Counter()
        items_by: Counter[tuple[str, str]] = Counter()
        with self.storage.open_read(rel) as raw:
            reader = _HashingReader(raw)
            try:
                for key, group in group_by_key(iter_members(reader)):  # type: ignore[arg-type]
                    if key in seen:
                        self.problem(
                            "member_order", rel, "its members are not contiguous in the tar (WebDataset "
                            "would read them as two samples)", key or None,
                        )
                    elif keys and key < keys[-1]:
                        self.problem("member_order", rel, f"comes after {keys[-1]}: samples are not in key order", key)
                    seen.add(key)
                    keys.append(key)
                    found = self.lint_sample(rel, name, key, group)
                    if found is None:
                        continue
                    if found.items is None:
                        items_known = False
                    else:
                        items += found.items
                    if found.task_split is not None:
                        counts[found.task_split] += 1
                        items_by[found.task_split] += found.items or 0
            except Exception as err:  # tarfile.ReadError, EOFError, zlib/struct errors on a damaged tar
                self.problem(
                    "shard_unreadable", rel,
                    f"the tar cannot be read past byte {reader.nbytes} ({type(err).__name__}: {err})",
                )
                self.unreadable.add(name)
            reader.drain()
        sha = reader.digest.hexdigest()
        if reader.nbytes != row["bytes"]:
            self.problem("shard_bytes", rel, f"size mismatch (manifest {row['bytes']}, file {reader.nbytes})")
        if sha != row["sha256"]:
            self.problem("shard_sha256", rel, f"sha256 mismatch (manifest {row['sha256']}, file {sha})")
        self.report.samples += len(keys)
        if name in self.unreadable:
            return
        if len(keys) != row["samples"]:
            self.problem("manifest_samples", rel, f"holds {len(keys)} samples, manifest.parquet says {row['samples']}")
        if items_known:
            if items != row["items"]:
                self.problem("manifest_items", rel, f"holds {items} items, manifest.parquet says {row['items']}")
            listed = {
                (c["task"], c["split"]): (c["records"], c["items"]) for c in (row["counts"] or [])
            }
            actual = {ts: (counts[ts], items_by[ts]) for ts in counts}
            if listed != actual:
                self.problem(
                    "manifest_counts", rel,
                    f"per task/split (records, items) are {_fmt_counts(actual)}, manifest.parquet says "
                    f"{_fmt_counts(listed)}",
                )

    def lint_sample(self, rel: str, shard: str, key: str, group: list[Member]) -> _Found | None:
        k = key or None
        by_ext: dict[str, bytes] = {}
        for member in group:
            if member.data is None:
                self.problem("member_type", rel, f"member {member.name!r} is a {member.kind}, not a regular file", k)
                continue
            if "/" in member.name or member.name.startswith("."):
                self.problem("member_name", rel, f"member {member.name!r} has a path; members are flat KEY.ext", k)
                continue
            ext = member.name.partition(".")[2]
            if ext not in MEMBER_EXTS:
                self.problem(
                    "member_name", rel,
                    f"member {member.name!r} is not KEY.jpg, KEY.png or KEY.json",
                    k,
                )
                continue
            if ext in by_ext:
                self.problem("member_duplicate", rel, f"member {member.name!r} occurs more than once", k)
                continue
            by_ext[ext] = member.data
        if not KEY_PATTERN.match(key):
            self.problem("member_name", rel, f"key {key!r} does not match [a-z0-9_-]+", k)
        images = [ext for ext in IMAGE_EXTS if ext in by_ext]
        if len(images) > 1:
            self.problem("member_missing", rel, "has two image members (KEY.jpg and KEY.png)", k)
        json_bytes = by_ext.get("json")
        if json_bytes is None:
            self.problem("member_missing", rel, "has no KEY.json member", k)
        image_ext = images[0] if len(images) == 1 else None
        image = by_ext.get(image_ext) if image_ext else None
        found = _Found(
            shard=shard,
            sample_sha256=hashlib.sha256(json_bytes).hexdigest() if json_bytes is not None else None,
            image_sha256=hashlib.sha256(image).hexdigest() if image is not None else None,
            facts=None,
            items=None,
            task_split=None,
        )
        if key in self.found:
            self.problem("duplicate_key", rel, f"the key also occurs in shard {SHARDS_DIR}/{self.found[key].shard}", k)
        else:
            self.found[key] = found
        if json_bytes is None:
            return found

        try:
            sample = ShardSample.model_validate_json(json_bytes)
        except ValidationError as err:
            self.problem("sample_json", rel, f"{key}.json does not validate as ShardSample: {_short(err)}", k)
            return found
        record = sample.record
        if record.image is None:  # a text-only chat record: KEY.json alone
            h = w = 0
            if images:
                self.problem("member_missing", rel, f"has {key}.{images[0]} but the record has no image", k)
        else:
            h, w = record.image.height, record.image.width
            if not images:
                self.problem("member_missing", rel, "has no image member (KEY.jpg or KEY.png)", k)
        if record.key != key:
            self.problem("sample_key", rel, f"{key}.json holds record.key {record.key!r}", k)
        if self.schema_version is not None and record.schema_version != self.schema_version:
            self.problem(
                "schema_version", rel,
                f"record schema_version {record.schema_version} != dataset.json {self.schema_version}", k,
            )
        self.lint_items(rel, key, sample)

        # masks
        for i, seg in enumerate(record.segments):
            self.lint_mask(rel, key, f"segment {i} (id {seg.id})", seg.rle, h, w)
        if record.ignore is not None:
            self.lint_mask(rel, key, "ignore mask", record.ignore, h, w)
        for i, vp in enumerate(record.visual_prompts):
            if vp.rle is not None:
                self.lint_mask(rel, key, f"visual prompt {i}", vp.rle, h, w)

        # image
        if image is not None and record.image is not None:
            if image_ext != record.image.ext:
                self.problem("image_ext", rel, f"image member is {key}.{image_ext}, record.image.ext is {record.image.ext}", k)
            if found.image_sha256 != record.image.sha256:
                self.problem(
                    "image_sha256", rel,
                    f"image sha256 mismatch (record {record.image.sha256}, member {found.image_sha256})", k,
                )
            if len(image) != record.image.bytes:
                self.problem("image_bytes", rel, f"image size mismatch (record {record.image.bytes}, member {len(image)})", k)
            try:
                info = inspect_image(image, max_pixels=self.max_pixels, verify=self.verify)  # type: ignore[arg-type]
            except ImageRejected as err:
                self.problem("image_check", rel, f"image fails inspect_image ({self.verify}): {err}", k)
            else:
                if info.ext != image_ext:
                    self.problem("image_ext", rel, f"{key}.{image_ext} holds {info.format.upper()} bytes", k)
                if (info.width, info.height) != (w, h):
                    self.problem(
                        "image_size", rel,
                        f"image is {info.width}x{info.height}, record.image says {w}x{h}", k,
                    )

        found.items = len(sample.items)
        found.task_split = (record.task, record.source.split)
        found.facts = {
            "task": record.task,
            "corpus": record.source.corpus,
            "split": record.source.split,
            "upstream_ids": canonical_json(record.source.upstream_ids).decode(),
            "image_sha256": record.image.sha256 if record.image else "",
            "segments": len(record.segments),
            "items": len(sample.items),
            "width": w,
            "height": h,
            "text_chars": text_chars(sample.items),
        }
        self.report.items += len(sample.items)
        return found

    def lint_items(self, rel: str, key: str, sample: ShardSample) -> None:
        record = sample.record
        for i, item in enumerate(sample.items):
            what = f"item {i} ({item.key})"
            if item.record_key != key:
                self.problem("item", rel, f"{what} has record_key {item.record_key!r}", key)
            if item.index != i:
                self.problem("item", rel, f"{what} has index {item.index}, its position is {i}", key)
            if item.task != record.task:
                self.problem("item", rel, f"{what} has task {item.task}, the record's is {record.task}", key)
            for span in item.spans:
                if span.turn >= len(item.turns):
                    self.problem("item", rel, f"{what}: a span points at turn {span.turn} of {len(item.turns)}", key)
                if span.phrase_index is not None and span.phrase_index >= len(record.phrases):
                    self.problem("item", rel, f"{what}: span phrase_index {span.phrase_index} out of range", key)
                if span.prompt_index is not None and span.prompt_index >= len(record.visual_prompts):
                    self.problem("item", rel, f"{what}: span prompt_index {span.prompt_index} out of range", key)
            for seg in item.segs:
                for target in seg.targets:
                    if target.segment >= len(record.segments):
                        self.problem(
                            "item", rel,
                            f"{what}: <SEG> target segment {target.segment} out of range "
                            f"({len(record.segments)} segments)",
                            key,
                        )

    def lint_mask(self, rel: str, key: str, what: str, rle: RLE, h: int, w: int) -> None:
        self.report.masks += 1
        error = check_rle(rle, h, w, decode=self.verify == "full")
        if error:
            self.problem("mask", rel, f"{what}: {error}", key)

    # -- cross checks --------------------------------------------------------------------------

    def lint_index(self, index: list[dict[str, Any]], manifest_names: set[str]) -> None:
        rows: dict[str, dict[str, Any]] = {}
        for row in index:
            key = row["key"]
            if key in rows:
                self.problem("index_duplicate", INDEX, "the key has more than one row", key)
                continue
            rows[key] = row
        for key, row in rows.items():
            found = self.found.get(key)
            if found is None:
                if row["shard"] in self.unreadable:
                    continue  # already reported: that shard could not be read
                where = (
                    f"shard {SHARDS_DIR}/{row['shard']}" if row["shard"] in manifest_names
                    else f"shard {row['shard']!r}, which manifest.parquet does not list"
                )
                self.problem("index_missing_sample", INDEX, f"the row points at {where}, which has no such sample", key)
                continue
            rel = f"{SHARDS_DIR}/{found.shard}"
            if row["shard"] != found.shard:
                self.problem("index_shard", rel, f"index.parquet says the sample is in shard {row['shard']}", key)
            if found.sample_sha256 is not None and row["sample_sha256"] != found.sample_sha256:
                self.problem(
                    "index_sample_sha256", rel,
                    f"sha256 of {key}.json is {found.sample_sha256}, index.parquet says {row['sample_sha256']}",
                    key,
                )
            if found.facts is not None:
                diffs = [
                    f"{col} {row[col]!r} (sample: {value!r})"
                    for col, value in found.facts.items()
                    if row[col] != value
                ]
                if diffs:
                    self.problem("index_row", rel, f"index.parquet row differs: {'; '.join(diffs)}", key)
        for key, found in self.found.items():
            if key not in rows:
                self.problem("index_missing_row", f"{SHARDS_DIR}/{found.shard}", "the sample has no row in index.parquet", key)

    def lint_totals(
        self,
        meta: dict[str, Any],
        manifest: list[dict[str, Any]],
        index: list[dict[str, Any]] | None,
        quarantine: list[dict[str, Any]] | None,
    ) -> None:
        totals = meta["totals"]

        def expect(name: str, value: int, source: str) -> None:
            have = totals.get(name)
            if have != value:
                self.problem("totals", DATASET, f"totals.{name} is {have}, {source} gives {value}")

        records_read, samples, quarantined = (totals.get(n) for n in ("records_read", "samples", "quarantined"))
        if not all(isinstance(v, int) for v in (records_read, samples, quarantined)):
            self.problem("totals", DATASET, "totals.records_read/samples/quarantined are not all integers")
        elif records_read != samples + quarantined:
            self.problem(
                "totals", DATASET,
                f"records_read {records_read} != samples {samples} + quarantined {quarantined}: a record was lost",
            )
        if index is not None:
            expect("samples", len(index), "index.parquet (rows)")
            expect("items", sum(r["items"] or 0 for r in index), "index.parquet (sum of items)")
            by_task: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
            for row in index:
                cell = by_task[row["task"]].setdefault(row["split"], {"records": 0, "items": 0})
                cell["records"] += 1
                cell["items"] += row["items"] or 0
            if meta.get("by_task") != by_task:
                self.problem("totals", DATASET, f"by_task {meta.get('by_task')} != index.parquet {dict(by_task)}")
        expect("samples", sum(r["samples"] for r in manifest), "manifest.parquet (sum of samples)")
        expect("items", sum(r["items"] for r in manifest), "manifest.parquet (sum of items)")
        expect("shards", len(manifest), "manifest.parquet (rows)")
        expect("bytes", sum(r["bytes"] for r in manifest), "manifest.parquet (sum of bytes)")
        if not self.unreadable:  # else the count is short by what could not be read (reported)
            expect("samples", self.report.samples, "the shards (samples read)")
        if quarantine is not None:
            levels = Counter(r["level"] for r in quarantine)
            expect("quarantined", levels["record"], "quarantine.parquet (record rows)")
            expect("quarantined_parts", levels["part"], "quarantine.parquet (part rows)")


def _fmt_counts(counts: dict[tuple[str, str], tuple[int, int]]) -> str:
    return "{" + ", ".join(f"{t}/{s}: {r} records, {i} items" for (t, s), (r, i) in sorted(counts.items())) + "}"


def _short(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ------------------------------------------------------------------------------------- entry


def lint_dataset(
    storage: Storage,
    *,
    verify: Literal["structural", "full"] = "structural",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    console: Any = None,
) -> LintReport:
    """Check everything in the dataset at `storage`; the report lists every problem found.

    `console` (a rich Console) shows a progress bar over the shards; None runs silently.
    """
    if verify not in ("structural", "full"):
        raise ValueError(f"verify must be 'structural' or 'full', got {verify!r}")
    report = LintReport(path=storage.url, verify=verify)
    linter = _Linter(storage, verify, max_pixels, report)

    if not storage.exists(MANIFEST):
        hint = (
            "a conversion into it did not finish; re-run the same `xsam data convert` command to resume"
            if storage.exists(f"{WORK_DIR}/plan.json")
            else "is this the --out folder of `xsam data convert`?"
        )
        linter.problem("missing_file", MANIFEST, f"{storage.describe(MANIFEST)} not found: not a complete dataset ({hint})")
        return report
    report.version = hashlib.sha256(storage.get_bytes(MANIFEST)).hexdigest()
    meta = linter.read_meta()
    manifest = linter.read_table(MANIFEST, MANIFEST_SCHEMA)
    index = linter.read_table(INDEX, INDEX_SCHEMA)
    quarantine = linter.read_table(QUARANTINE, QUARANTINE_SCHEMA)
    if manifest is None:
        return report

    names = [row["name"] for row in manifest]
    for name, n in Counter(names).items():
        if n > 1:
            linter.problem("manifest_duplicate", MANIFEST, f"shard {name} is listed {n} times")
    rows = []
    for row in manifest:
        if not isinstance(row["name"], str) or not _SHARD_NAME.match(row["name"]):
            linter.problem("manifest_name", MANIFEST, f"shard name {row['name']!r} is not a plain NAME.tar")
        elif row["name"] not in {r["name"] for r in rows}:
            rows.append(row)
    listed = {f"{SHARDS_DIR}/{row['name']}" for row in rows}
    for rel in storage.list(f"{SHARDS_DIR}/"):
        if rel not in listed:
            linter.problem("shard_extra", rel, "the file is not listed in manifest.parquet")

    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("[bold]linting[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
            TextColumn("{task.fields[samples]} samples"), TimeElapsedColumn(), console=console, transient=True,
        )
        with progress:
            bar = progress.add_task("lint", total=len(rows), samples=0)
            for row in rows:
                linter.lint_shard(row)
                progress.update(bar, advance=1, samples=report.samples)
    else:
        for row in rows:
            linter.lint_shard(row)

    if index is not None:
        linter.lint_index(index, {row["name"] for row in rows})
    if meta is not None:
        linter.lint_totals(meta, manifest, index, quarantine)
    return report
