"""The metadata files of a dataset folder, all deterministic (no timestamps, hosts, paths, workers).

- `manifest.parquet`: one row per shard (name, sha256, bytes, samples, items, per task/split counts).
  Written LAST: a folder with a manifest is complete. Its sha256 is the dataset's version id.
- `index.parquet`: one row per record (key, shard, task, split, source ids, image sha256, ...,
  `text_chars`: the length of its first rendered item, which the loader's length grouping reads).
- `quarantine.parquet`: one row per rejected record or part, with a reason code and a message.
- `dataset.json`: schema version, corpus, converter version, output-changing parameters, sha256 of
  every annotation input, category table and totals.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xsam.data.storage import Storage

MANIFEST = "manifest.parquet"
INDEX = "index.parquet"
QUARANTINE = "quarantine.parquet"
DATASET = "dataset.json"
SHARDS_DIR = "shards"
WORK_DIR = "_work"
LOGS_DIR = "logs"

# Version of the folder layout (file names, columns); the record schema has its own version.
# 2: index.parquet gained `text_chars` (the loader's length-grouping proxy).
LAYOUT_VERSION = "2"

COUNTS_TYPE = pa.list_(
    pa.struct([("task", pa.string()), ("split", pa.string()), ("records", pa.int64()), ("items", pa.int64())])
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("samples", pa.int64()),
        ("items", pa.int64()),
        ("counts", COUNTS_TYPE),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("task", pa.string()),
        ("corpus", pa.string()),
        ("split", pa.string()),
        ("upstream_ids", pa.string()),  # canonical JSON of Source.upstream_ids
        ("image_sha256", pa.string()),
        ("sample_sha256", pa.string()),  # sha256 of the KEY.json member: what `diff` compares
        ("segments", pa.int64()),
        ("items", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("text_chars", pa.int64()),  # characters of the default rendering's first item (length proxy)
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("level", pa.string()),
        ("source_file", pa.string()),
        ("record_id", pa.string()),
        ("part_id", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


def parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    """Rows -> parquet bytes, deterministic for a given pyarrow version (pinned)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3, write_statistics=True)
    return buf.getvalue()


def read_parquet_table(data: bytes) -> pa.Table:
    """Parquet bytes -> table, single-threaded.

    pyarrow 26's reader thread pool can abort the interpreter at exit ("terminate called without
    an active exception", seen in ~7% of short CLI runs on a loaded 2-core machine); our metadata
    files are small, so threads buy nothing here.
    """
    return pq.read_table(io.BytesIO(data), use_threads=False, pre_buffer=False)


def read_parquet(storage: Storage, rel: str) -> list[dict[str, Any]]:
    return read_parquet_table(storage.get_bytes(rel)).to_pylist()


def index_by_shard(storage: Storage, columns: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """index.parquet's `columns` per record, grouped by shard name in shard order (rows are
    written in shard order): what readers need to map a shard's items to its records."""
    table = read_parquet_table(storage.get_bytes(INDEX))
    missing = [c for c in columns if c not in table.schema.names]
    if missing:
        raise KeyError(f"{storage.describe(INDEX)} has no column(s) {', '.join(missing)}")
    cols = table.select(["shard", *columns]).to_pydict()
    out: dict[str, list[tuple[Any, ...]]] = {}
    for shard, *values in zip(cols["shard"], *(cols[c] for c in columns), strict=True):
        out.setdefault(shard, []).append(tuple(values))
    return out


def dataset_json_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def version_id(storage: Storage) -> str:
    """The dataset's version id: sha256 of its manifest."""
    return hashlib.sha256(storage.get_bytes(MANIFEST)).hexdigest()


@dataclass(kw_only=True, slots=True)
class DatasetFiles:
    """A complete dataset folder's metadata, read back."""

    meta: dict[str, Any]
    manifest: list[dict[str, Any]]
    version: str


def is_complete(storage: Storage) -> bool:
    return storage.exists(MANIFEST) and storage.exists(DATASET)


def require_complete(storage: Storage) -> None:
    """FileNotFoundError, saying what to do, unless the folder holds a complete dataset."""
    if not storage.exists(MANIFEST):
        hint = (
            "a conversion into it did not finish; re-run the same `xsam data convert` command to resume"
            if storage.exists(f"{WORK_DIR}/plan.json")
            else "is this the --out folder of `xsam data convert`?"
        )
        raise FileNotFoundError(f"{storage.describe(MANIFEST)} not found: not a complete dataset ({hint})")


def load_dataset(storage: Storage) -> DatasetFiles:
    """Read `dataset.json` + `manifest.parquet`; a clear error when the folder is not complete."""
    require_complete(storage)
    meta = json.loads(storage.get_bytes(DATASET))
    manifest = read_parquet(storage, MANIFEST)
    return DatasetFiles(meta=meta, manifest=manifest, version=version_id(storage))
