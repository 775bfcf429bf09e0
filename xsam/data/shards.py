"""Random access into a source's WebDataset shards, local or on S3, verified against the manifest.

- A shard is opened once per process: its tar headers are scanned (no member data is read) to map
  every record key to the offsets of its `KEY.json` and `KEY.<jpg|png>` members, and members are then
  read with `os.pread`. The planner's bounded shuffle (`xsam.data.plan`) keeps the set of shards a
  reader touches small, so a handful of open files serve a whole window.
- Every shard's sha256 is checked against `manifest.parquet` on first read: a corrupt or replaced
  shard is a `ShardError` naming the shard and the fix, never a silent skip. A local shard verified
  once is remembered by (size, mtime, inode) in the cache folder, so other workers and later runs on
  the machine do not hash it again.
- Shards on S3 are downloaded into a bounded local cache (`ShardCache`: files named by their sha256,
  written to a temporary name and renamed, evicted least-recently-used past `max_bytes`), shared by
  all ranks and workers of the machine. The download is hashed as it streams; boto3 retries
  throttling and dropped connections, a download cut mid-body resumes where it stopped
  (`xsam.data.storage`), and a download whose hash is wrong is retried once before the shard is
  declared corrupt. A shard the manifest lists but the bucket lacks is a `ShardError` naming its
  URI. Endpoint and credentials come from the standard AWS environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xsam.data.manifest import DATASET, INDEX, SHARDS_DIR, index_by_shard, read_parquet, require_complete
from xsam.data.plan import SourceInfo
from xsam.data.schema import Item, Record, ShardSample
from xsam.data.storage import CHUNK, Storage, open_storage

DEFAULT_CACHE_BYTES = 32 << 30
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$XSAM_CACHE_DIR/shards`, else `~/.cache/xsam/shards`."""
    root = os.environ.get("XSAM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "xsam") / "shards"


class ShardError(RuntimeError):
    """A shard that cannot be used (missing, corrupt, not a tar): stop, never skip silently."""


@dataclass(frozen=True, slots=True)
class _Member:
    offset: int
    size: int


class ShardCache:
    """Local copies of remote shards (and verification marks of local ones), bounded in bytes."""

    def __init__(self, root: str | Path | None = None, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def _marks(self) -> Path:
        return self.root / "verified"

    def is_verified(self, path: Path, sha256: str) -> bool:
        mark = self._marks() / sha256
        try:
            return mark.read_text() == _identity(path)
        except OSError:
            return False

    def mark_verified(self, path: Path, sha256: str) -> None:
        folder = self._marks()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{sha256}-{uuid.uuid4().hex}"
        tmp.write_text(_identity(path))
        os.replace(tmp, folder / sha256)

    def fetch(self, storage: Storage, rel: str, sha256: str, size: int) -> Path:
        """The local path of a verified copy of `rel`, downloading it when not cached."""
        final = self.root / f"{sha256}.tar"
        if final.is_file() and final.stat().st_size == size:
            os.utime(final)  # recently used: evicted last
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        self._evict(keep=size)
        where = storage.describe(rel)
        for attempt in (1, 2):
            tmp = self.root / f".tmp-{sha256}-{uuid.uuid4().hex}"
            digest = hashlib.sha256()
            try:
                try:
                    stream = storage.open_read(rel)
                except FileNotFoundError:
                    raise ShardError(
                        f"shard {where} is missing; the manifest lists it."
                        " Restore the dataset folder or re-run its conversion"
                    ) from None
                with stream, open(tmp, "wb") as out:
                    for block in iter(lambda: stream.read(CHUNK), b""):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() == sha256:
                    os.replace(tmp, final)
                    return final
                problem = f"is corrupt: sha256 {digest.hexdigest()} != manifest {sha256}"
            except ShardError:
                raise
            except Exception as exc:  # failed after the storage's own retries, or its transfer checksum
                if attempt == 2:
                    raise ShardError(
                        f"shard {where} could not be downloaded intact (tried twice; last: {type(exc).__name__}:"
                        f" {exc}). Check the storage endpoint, then re-run; re-upload the dataset folder if it persists"
                    ) from exc
                log.warning("downloading shard %s failed (%s: %s); downloading it again", where,
                            type(exc).__name__, exc)
                continue
            finally:
                tmp.unlink(missing_ok=True)
            if attempt == 2:
                raise ShardError(
                    f"shard {where} {problem} (downloaded twice). Re-upload the dataset folder or re-run its conversion"
                )
            log.warning("shard %s %s; downloading it again", where, problem)
        raise AssertionError("unreachable")

    def _evict(self, keep: int) -> None:
        files = [p for p in self.root.glob("*.tar") if p.is_file()]
        total = sum(p.stat().st_size for p in files) + keep
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)  # a reader that has it open keeps reading its inode


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _scan_tar(path: Path, shard: str) -> tuple[list[str], dict[str, dict[str, _Member]]]:
    """Record keys in shard order and their members' offsets, from the tar headers alone."""
    keys: list[str] = []
    members: dict[str, dict[str, _Member]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, dot, ext = info.name.partition(".")
                if not dot:
                    raise ShardError(f"shard {shard}: member {info.name!r} has no extension")
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                members[key][ext] = _Member(info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise ShardError(f"shard {shard} is not a readable tar file: {exc}") from None
    return keys, members


class _OpenShard:
    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self.keys, self.members = _scan_tar(path, name)
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, key: str, ext: str) -> bytes:
        member = self.members.get(key, {}).get(ext)
        if member is None:
            raise ShardError(f"shard {self.name}: no member {key}.{ext}")
        data = os.pread(self.fd, member.size, member.offset)
        if len(data) != member.size:
            raise ShardError(f"shard {self.name}: member {key}.{ext} is truncated")
        return data

    def close(self) -> None:
        os.close(self.fd)


class ShardReader:
    """Members of one source's records, by (shard index, item ordinal in the shard)."""

    def __init__(self, source: SourceInfo, cache: ShardCache, *, max_open: int = 16) -> None:
        self.source = source
        self.cache = cache
        self.max_open = max_open
        self._storage: Storage | None = None
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._items_by_shard: dict[str, list[tuple[str, int]]] | None = None

    def __getstate__(self) -> dict:
        # sent to dataloader workers before first use: nothing open crosses a process boundary
        return {"source": self.source, "cache": self.cache, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["source"], state["cache"], max_open=state["max_open"])

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.source.spec.path)
        return self._storage

    def shard(self, k: int) -> _OpenShard:
        hit = self._open.get(k)
        if hit is not None:
            self._open.move_to_end(k)
            return hit
        info = self.source.shards[k]
        rel = f"{SHARDS_DIR}/{info.name}"
        where = self.storage.describe(rel)
        local = self.storage.local_path(rel)
        if local is not None:
            if not local.is_file():
                raise ShardError(
                    f"shard {where} of source {self.source.name!r} is missing; the manifest lists it."
                    " Restore the dataset folder or re-run its conversion"
                )
            if not self.cache.is_verified(local, info.sha256):
                with open(local, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if digest != info.sha256:
                    raise ShardError(
                        f"shard {where} of source {self.source.name!r} is corrupt: sha256 {digest} != manifest"
                        f" {info.sha256}. Re-run its conversion (`xsam data lint` shows what changed)"
                    )
                self.cache.mark_verified(local, info.sha256)
            opened = _OpenShard(local, where)
        else:
            opened = self._open_cached(rel, info.sha256, info.bytes, where)
        self._open[k] = opened
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return opened

    def _open_cached(self, rel: str, sha256: str, size: int, where: str) -> _OpenShard:
        """Fetch into the cache and open; another process's eviction may remove the file between
        the two, so fetch once more before giving up (never a silent skip)."""
        for attempt in (1, 2):
            try:
                return _OpenShard(self.cache.fetch(self.storage, rel, sha256, size), where)
            except ShardError:
                raise
            except FileNotFoundError:
                if attempt == 2:
                    raise ShardError(
                        f"shard {where}: evicted from the cache {self.cache.root} as soon as it was fetched;"
                        " raise cache_bytes above what the readers of this machine keep open"
                    ) from None
            except Exception as exc:  # botocore errors after its retries
                raise ShardError(f"cannot read shard {where} of source {self.source.name!r}: {exc}") from exc
        raise AssertionError("unreachable")

    def locate(self, k: int, item: int) -> tuple[str, int]:
        """(record key, item index within the record) of the item-th used item of shard k."""
        info = self.source.shards[k]
        item = info.raw_item(item)
        if info.total_items == info.samples:  # one item per record: training splits
            return self.shard(k).keys[item], 0
        rows = self._record_items()[info.name]
        for key, n in rows:
            if item < n:
                return key, item
            item -= n
        raise ShardError(f"shard {info.name}: item {item} beyond the index's item counts")

    def _record_items(self) -> dict[str, list[tuple[str, int]]]:
        """Per shard, (record key, items) in shard order, from index.parquet (read once, lazily:
        only sources whose records render several items, i.e. evaluation splits, need it)."""
        if self._items_by_shard is None:
            try:
                self._items_by_shard = index_by_shard(self.storage, ["key", "items"])
            except Exception as exc:  # not a bad item: the loader must stop, not skip records
                raise ShardError(f"cannot read {self.storage.describe(INDEX)} of source {self.source.name!r}:"
                                 f" {type(exc).__name__}: {exc}") from exc
        return self._items_by_shard

    def read(self, k: int, key: str, ext: str) -> bytes:
        return self.shard(k).read(key, ext)

    def close(self) -> None:
        for opened in self._open.values():
            opened.close()
        self._open.clear()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as its shard stores it: the record, its default rendering, the image bytes."""

    record: Record
    items: list[Item]
    image: bytes | None
    shard: str


def dataset_splits(path: str | Path) -> list[str]:
    """The upstream splits a complete dataset folder holds (dataset.json `splits`)."""
    storage = open_storage(path)
    require_complete(storage)
    meta = json.loads(storage.get_bytes(DATASET))
    return sorted(meta.get("splits") or {row["split"] for row in read_parquet(storage, INDEX)})


def read_records(
    path: str | Path,
    *,
    splits: list[str] | None = None,
    images: bool = False,
    cache: ShardCache | None = None,
) -> Iterator[StoredRecord]:
    """Every record of the dataset at `path` (local or s3://) whose split is in `splits` (default:
    all), in shard order, each shard verified against the manifest as the loader does. Evaluation
    reads its ground truth this way; `images=True` also returns each record's encoded image."""
    known = dataset_splits(path)
    unknown = sorted(set(splits or []) - set(known))
    if unknown:
        raise ValueError(f"{path} has no split(s) {', '.join(unknown)}; it holds {', '.join(known) or 'none'}")
    reader = RecordReader(path, cache, splits=splits)
    wanted = set(splits) if splits is not None else None
    try:
        for info in reader.source.shards:
            if info.items == 0:
                continue
            for key in reader.keys(info.name):
                stored = reader.get(info.name, key, image=images, splits=wanted)
                if stored is not None:
                    yield stored
    finally:
        reader.close()


class RecordReader:
    """Random access to a dataset folder's records by (shard name, record key): what evaluation
    workers use to fetch the records the driver assigned them (verified and cached like the loader).
    `splits` leaves out the shards that hold none of them."""

    def __init__(self, path: str | Path, cache: ShardCache | None = None, *, splits: list[str] | None = None) -> None:
        from xsam.data.mixture import SourceSpec
        from xsam.data.plan import open_source

        self.source = open_source(SourceSpec(name="records", path=str(path), repetitions=1.0, splits=splits))
        self.path = str(path)
        self.reader = ShardReader(self.source, cache or ShardCache())
        self.shards = {info.name: k for k, info in enumerate(self.source.shards)}

    def _index(self, shard: str) -> int:
        k = self.shards.get(shard)
        if k is None:
            raise ShardError(f"{self.path}: the manifest lists no shard {shard}")
        return k

    def keys(self, shard: str) -> list[str]:
        """The record keys of a shard, in shard order."""
        return self.reader.shard(self._index(shard)).keys

    def get(self, shard: str, key: str, *, image: bool = True, splits: set[str] | None = None) -> StoredRecord | None:
        """The record (and its image); None when `splits` is given and the record's split is not in it
        (its image is then not read)."""
        k = self._index(shard)
        sample = ShardSample.model_validate_json(self.reader.read(k, key, "json"))
        record = sample.record
        if splits is not None and record.source.split not in splits:
            return None
        data = self.reader.read(k, key, record.image.ext) if image and record.image is not None else None
        return StoredRecord(record=record, items=sample.items, image=data, shard=shard)

    def close(self) -> None:
        self.reader.close()
