"""The global-batch planner: every item of every global batch of an epoch, from (manifests, seed, epoch).

Nothing here reads a shard. The plan is computed from each source's `manifest.parquet` (shard
names and item counts) and the mixture spec, and it is a pure function of them and (seed, epoch):
every rank and every dataloader worker computes the same plan on its own, so no rank waits for
another and none scans a full index at start-up.

Layers, bottom up:

1. **A source's stream** (`SourceOrder`). A source's items form an endless stream of *passes*;
   each pass visits every item once: the shards in a shuffled order (seeded by seed, source,
   pass), and within that shard-order stream, windows of `shuffle_buffer` items shuffled among
   themselves. That is a bounded shuffle (a reader only ever needs the shards of the current
   window) whose position -> item map is random access: no buffer state to carry or replay.
2. **An epoch's items per source.** `xsam.data.mixture.epoch_counts` gives L_d; epoch e takes
   stream positions [e * L_d, (e + 1) * L_d) of source d, so an up-sampled source starts a new
   pass (new order) within the epoch and a down-weighted one continues in the next epoch where it
   stopped.
3. **Global batches** (`EpochPlan`) of `global_batch_size` G items:
   - `mixed`: the epoch's items of all sources are interleaved in a seeded random order and cut
     into batches of G;
   - `source_grouped` (X-SAM's SourceGroupedSampler, spec §2.3): each source's items are cut into
     groups of G in stream order and the groups of all sources are shuffled, so every global step
     holds one source (and one task), on every rank;
   - the incomplete last batch (per epoch, or per source when grouped) is padded with the items
     just before it (X-SAM's round-up; `remainder: pad`) or dropped (`remainder: drop`); both counted;
   - `group_by_length`: within windows of `length_window` global batches (of one source when
     grouped), items are sorted by text length before they are cut into batches, and the batches
     of a window are then shuffled, so a batch holds similar lengths (less padding) while the
     order of batches stays random. The length is the index's `text_chars` (characters of the
     record's first rendered item), read from each source's index.parquet once per process.
4. **A rank's slice** (`RankPlan`): rank r of W takes the slots r, r + W, r + 2W, ... of every global
   batch (X-SAM's `r::world_size`), so every rank gets exactly G / W items of every global batch and
   the same number of batches per epoch: no rank waits at a collective for one that ran dry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np

from xsam.data.manifest import DATASET, INDEX, MANIFEST, index_by_shard, read_parquet_table, require_complete
from xsam.data.mixture import MixtureError, MixtureSpec, SourceSpec, epoch_counts
from xsam.data.storage import Storage, open_storage


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any JSON-able parts, the same in every process (sha256, never `hash()`)."""
    payload = json.dumps(list(parts), separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big")


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard as the manifest lists it. `items` counts the items the mixture uses; with a
    `splits` filter, `select` lists their ordinals among all `total_items` of the shard."""

    name: str
    sha256: str
    bytes: int
    samples: int
    items: int
    total_items: int
    select: tuple[int, ...] | None = None

    def raw_item(self, i: int) -> int:
        """The ordinal among all the shard's items of the i-th used item."""
        return self.select[i] if self.select is not None else i


@dataclass(frozen=True)
class SourceInfo:
    """One source of the mixture, as its dataset folder describes it."""

    spec: SourceSpec
    version: str  # sha256 of manifest.parquet: the dataset's version id
    meta: dict[str, Any]  # dataset.json
    shards: tuple[ShardInfo, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def items(self) -> int:
        return sum(s.items for s in self.shards)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.meta.get("by_task", {}))


def open_source(spec: SourceSpec, storage: Storage | None = None) -> SourceInfo:
    """Read a source's manifest and dataset.json (two small files; the shards are not touched)."""
    storage = storage or open_storage(spec.path)
    try:
        require_complete(storage)
    except FileNotFoundError as err:
        raise MixtureError(f"source {spec.name!r}: {err}") from None
    manifest_bytes = storage.get_bytes(MANIFEST)
    cols = read_parquet_table(manifest_bytes).to_pydict()
    shards = []
    mixed: list[int] = []  # shards holding wanted and unwanted splits
    wanted = set(spec.splits) if spec.splits is not None else None
    for k, (name, sha, size, samples, items, counts) in enumerate(
        zip(cols["name"], cols["sha256"], cols["bytes"], cols["samples"], cols["items"], cols["counts"], strict=True)
    ):
        used = items if wanted is None else sum(c["items"] for c in counts if c["split"] in wanted)
        if 0 < used < items:
            mixed.append(k)
        shards.append(ShardInfo(name=name, sha256=sha, bytes=size, samples=samples, items=used, total_items=items))
    if mixed and wanted is not None:
        shards = _select_splits(storage, shards, mixed, wanted)
    meta = json.loads(storage.get_bytes(DATASET))
    return SourceInfo(spec=spec, version=hashlib.sha256(manifest_bytes).hexdigest(), meta=meta, shards=tuple(shards))


def _select_splits(storage: Storage, shards: list[ShardInfo], mixed: list[int], wanted: set[str]) -> list[ShardInfo]:
    """Item ordinals of the wanted splits in shards that hold several splits, from index.parquet
    (read only here: a split filter on a dataset whose shards straddle splits)."""
    rows = index_by_shard(storage, ["split", "items"])
    out = list(shards)
    for k in mixed:
        info, select, at = shards[k], [], 0
        for split, n in rows.get(info.name, []):
            if split in wanted:
                select.extend(range(at, at + n))
            at += n
        if len(select) != info.items or at != info.total_items:
            raise MixtureError(f"{storage.describe(INDEX)} disagrees with the manifest about shard {info.name}")
        out[k] = dataclasses.replace(info, select=tuple(select))
    return out


def open_sources(spec: MixtureSpec) -> list[SourceInfo]:
    return [open_source(s) for s in spec.sources]


def fingerprint(spec: MixtureSpec, sources: list[SourceInfo]) -> str:
    """What a loader state is only valid for: the data (by version, not by path: a dataset copied
    to S3 keeps its fingerprint), the seed and everything that shapes the plan."""
    doc = {
        "seed": spec.seed,
        "oversample_ratio": spec.oversample_ratio,
        "epoch_items": spec.epoch_items,
        "shuffle_buffer": spec.shuffle_buffer,
        "batching": spec.batching.model_dump(mode="json"),
        "sources": [
            {**s.spec.model_dump(mode="json", exclude={"path"}), "version": s.version} for s in sources
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ one source's stream


@dataclass(frozen=True, slots=True)
class ItemRef:
    """Where one planned item lives: source, shard, the item's ordinal within the shard, and the
    source pass it belongs to (training renders the item with the pass as its epoch, so each
    repetition of an up-sampled source gets new templates and augmentations)."""

    source: int
    shard: int
    item: int
    pass_: int
    position: int  # in the source's stream


class SourceOrder:
    """Stream position -> (shard, item in shard, pass) for one source: random access, cached."""

    def __init__(self, seed: int, index: int, source: SourceInfo, window: int) -> None:
        self.seed = seed
        self.index = index
        self.name = source.name
        self.counts = np.array([s.items for s in source.shards], dtype=np.int64)
        self.total = int(self.counts.sum())
        self.window = max(1, min(window, self.total))
        self._passes: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _pass(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._passes.get(p)
        if hit is None:
            order = _rng(self.seed, "shards", self.name, p).permutation(len(self.counts))
            ends = np.cumsum(self.counts[order])
            hit = (order, ends)
            self._passes[p] = hit
            if len(self._passes) > 4:
                self._passes.popitem(last=False)
        return hit

    def _window_perm(self, p: int, w: int) -> np.ndarray:
        hit = self._windows.get((p, w))
        if hit is None:
            size = min(self.window, self.total - w * self.window)
            hit = _rng(self.seed, "window", self.name, p, w).permutation(size)
            self._windows[(p, w)] = hit
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return hit

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`locate` for many positions at once: (shard indices, item ordinals)."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.empty(len(positions), dtype=np.int64)
        items = np.empty(len(positions), dtype=np.int64)
        passes, q = np.divmod(positions, self.total)
        windows, off = np.divmod(q, self.window)
        for p in np.unique(passes):
            order, ends = self._pass(int(p))
            in_pass = passes == p
            for w in np.unique(windows[in_pass]):
                sel = in_pass & (windows == w)
                u = w * self.window + self._window_perm(int(p), int(w))[off[sel]]
                k = np.searchsorted(ends, u, side="right")
                starts = np.where(k > 0, ends[np.maximum(k - 1, 0)], 0)
                shards[sel], items[sel] = order[k], u - starts
        return shards, items

    def locate(self, position: int) -> ItemRef:
        """Where the item at one stream position lives (`locate_many` for one position)."""
        shards, items = self.locate_many(np.array([position], dtype=np.int64))
        return ItemRef(
            source=self.index, shard=int(shards[0]), item=int(items[0]), pass_=int(position) // self.total,
            position=int(position),
        )


# ------------------------------------------------------------------------------------ epoch plan


@dataclass(frozen=True, slots=True)
class PlanStats:
    items: dict[str, int]  # planned items per source (L_d)
    padded: int  # items repeated to fill incomplete batches
    dropped: int  # items left out by `remainder: drop`
    global_batches: int


@dataclass
class EpochPlan:
    """Every global batch of one epoch as (source index, source stream position) pairs."""

    spec: MixtureSpec
    sources: list[SourceInfo]
    epoch: int
    lengths: Callable[[int, np.ndarray], np.ndarray] | None = None  # (source, positions) -> lengths
    counts: dict[str, int] = field(init=False)
    stats: PlanStats = field(init=False)

    def __post_init__(self) -> None:
        spec, g = self.spec, self.spec.batching.global_batch_size
        self.counts = epoch_counts(spec, {s.name: s.items for s in self.sources})
        lengths = [self.counts[s.name] for s in self.sources]
        self._starts = [self.epoch * n for n in lengths]
        rng = _rng(spec.seed, "epoch", self.epoch)
        padded = dropped = 0
        if spec.batching.mode == "source_grouped":
            groups: list[tuple[int, np.ndarray]] = []
            for d, n in enumerate(lengths):
                local = np.arange(n, dtype=np.int64)
                if self.lengths is not None:
                    local = self._sort_windows(local, self.lengths(d, local + self._starts[d]))
                full, rem = divmod(n, g)
                for b in range(full):
                    groups.append((d, local[b * g : (b + 1) * g]))
                if rem:
                    if spec.batching.remainder == "pad":
                        groups.append((d, _round_up(local, rem, g)))
                        padded += g - rem
                    else:
                        dropped += rem
            order = rng.permutation(len(groups))
            self._src = np.array([groups[i][0] for i in order], dtype=np.int32)
            self._local = [groups[i][1] for i in order]
            self._mixed = None
        else:
            labels = np.repeat(np.arange(len(lengths), dtype=np.int16), lengths)
            labels = labels[rng.permutation(len(labels))]
            occurrence = np.empty(len(labels), dtype=np.int64)
            for d in range(len(lengths)):
                where = np.flatnonzero(labels == d)
                occurrence[where] = np.arange(len(where))
            full, rem = divmod(len(labels), g)
            index = np.arange(full * g, dtype=np.int64)
            if rem:
                if spec.batching.remainder == "pad":
                    index = np.concatenate([index, _round_up(np.arange(len(labels), dtype=np.int64), rem, g)])
                    padded += g - rem
                else:
                    dropped += rem
            if self.lengths is not None:
                index = self._group_mixed(index, labels, occurrence, rng)
            self._mixed = (labels[index], occurrence[index])
        n_batches = len(self._local) if self._mixed is None else len(self._mixed[0]) // g
        self.stats = PlanStats(items=dict(self.counts), padded=padded, dropped=dropped, global_batches=n_batches)

    def _sort_windows(self, entries: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """`entries` with each window of `length_window` global batches sorted by length, longest first."""
        span = self.spec.batching.length_window * self.spec.batching.global_batch_size
        out = entries.copy()
        for lo in range(0, len(entries), span):
            order = np.argsort(-lens[lo : lo + span], kind="stable")
            out[lo : lo + span] = entries[lo : lo + span][order]
        return out

    def _group_mixed(
        self, index: np.ndarray, labels: np.ndarray, occurrence: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        assert self.lengths is not None
        g, m = self.spec.batching.global_batch_size, self.spec.batching.length_window
        src = labels[index].astype(np.int64)
        lens = np.empty(len(index), dtype=np.int64)
        for d in np.unique(src):
            sel = src == d
            lens[sel] = self.lengths(int(d), occurrence[index[sel]] + self._starts[int(d)])
        grouped = self._sort_windows(index, lens)
        batches = grouped.reshape(-1, g)
        for lo in range(0, len(batches), m):  # keep the order of batches random within a window
            batches[lo : lo + m] = batches[lo : lo + m][rng.permutation(len(batches[lo : lo + m]))]
        return batches.reshape(-1)

    @property
    def global_batches(self) -> int:
        return self.stats.global_batches

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Global batch b: (source index per slot, source stream position per slot)."""
        g = self.spec.batching.global_batch_size
        if not 0 <= b < self.global_batches:
            raise IndexError(f"global batch {b} out of range (epoch {self.epoch} has {self.global_batches})")
        if self._mixed is None:
            d = int(self._src[b])
            return np.full(g, d, dtype=np.int64), self._local[b] + self._starts[d]
        src, occ = self._mixed[0][b * g : (b + 1) * g], self._mixed[1][b * g : (b + 1) * g]
        starts = np.asarray(self._starts, dtype=np.int64)
        return src.astype(np.int64), occ + starts[src]

    def source_items_before(self, b: int) -> np.ndarray:
        """Items of each source in global batches [0, b) of this epoch (accounting)."""
        g = self.spec.batching.global_batch_size
        out = np.zeros(len(self.sources), dtype=np.int64)
        if self._mixed is None:
            np.add.at(out, self._src[:b], g)
        else:
            np.add.at(out, self._mixed[0][: b * g].astype(np.int64), 1)
        return out


def _round_up(index: np.ndarray, rem: int, g: int) -> np.ndarray:
    """The last `rem` entries of `index`, padded to `g` with the entries just before them (X-SAM's
    round-up); cycling when there are fewer than g entries in all."""
    tail = index[len(index) - rem :]
    before = index[: len(index) - rem]
    need = g - rem
    if len(before) >= need:
        fill = before[len(before) - need :]
    else:
        fill = np.resize(index, need)
    return np.concatenate([fill, tail])


class PlanCache:
    """EpochPlans and SourceOrders of one mixture, built on first use and kept for reuse."""

    def __init__(self, spec: MixtureSpec, sources: list[SourceInfo]) -> None:
        self.spec = spec
        self.sources = sources
        self.orders = [SourceOrder(spec.seed, i, s, spec.shuffle_buffer) for i, s in enumerate(sources)]
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._lengths: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> EpochPlan:
        plan = self._plans.get(e)
        if plan is None:
            lengths = self.item_lengths if self.spec.batching.group_by_length else None
            plan = EpochPlan(self.spec, self.sources, e, lengths)
            self._plans[e] = plan
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
        return plan

    def item_lengths(self, d: int, positions: np.ndarray) -> np.ndarray:
        """Text lengths of source d's items at these stream positions (length grouping)."""
        if d not in self._lengths:
            self._lengths[d] = _source_lengths(self.sources[d])
        flat, offsets = self._lengths[d]
        shards, items = self.orders[d].locate_many(positions)
        return flat[offsets[shards] + items]


def _source_lengths(source: SourceInfo) -> tuple[np.ndarray, np.ndarray]:
    """Per used item of every shard, its record's `text_chars`: (flat lengths, offset per shard)."""
    storage = open_storage(source.spec.path)
    try:
        rows = index_by_shard(storage, ["items", "text_chars"])
    except KeyError:
        raise MixtureError(
            f"source {source.name!r}: {storage.describe(INDEX)} has no text_chars column (converted before"
            " layout 2). Re-run its conversion, or set batching.group_by_length: false"
        ) from None
    per_shard = {shard: [chars for n, chars in records for _ in range(n)] for shard, records in rows.items()}
    flat, offsets = [], [0]
    for info in source.shards:
        lens = per_shard.get(info.name, [])
        if len(lens) != info.total_items:
            raise MixtureError(f"{storage.describe(INDEX)} disagrees with the manifest about shard {info.name}")
        used = [lens[info.raw_item(i)] for i in range(info.items)]
        flat.extend(used)
        offsets.append(offsets[-1] + len(used))
    return np.asarray(flat, dtype=np.int64), np.asarray(offsets[:-1], dtype=np.int64)


# ------------------------------------------------------------------------------------- rank view


@dataclass(frozen=True, slots=True)
class RankLayout:
    """How a global batch is split: rank r takes slots r, r + W, ... (X-SAM's r::world_size)."""

    global_batch_size: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by world size {self.world_size}:"
                " every rank must get the same number of items per step; change batching.global_batch_size"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    def sample(self, j: int) -> tuple[int, int]:
        """The rank's j-th sample of an epoch -> (global batch, slot)."""
        b, i = divmod(j, self.per_rank)
        return b, self.rank + i * self.world_size
