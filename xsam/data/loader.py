"""The co-training stream: a rank's batches of a mixture, with exact resume and accounting.

`StreamLoader(mixture, world_size=W, rank=r, num_workers=K)` yields rank r's micro-batches of an
epoch (then moves to the next epoch), built from the global-batch plan of `xsam.data.plan`:

- **Who decides what.** The plan (which item is in which slot of which global batch) is computed in
  every process from the manifests, seed and epoch. Dataloader workers only fetch and decode: the
  rank's micro-batches are numbered from its current position, worker k builds micro-batches
  k, k + K, ... and torch's DataLoader returns them in order. Workers hold no state of their own.
- **State.** `state_dict()` is small: the epoch, the number of items this rank has consumed in it
  (`position`), the plan's fingerprint and the counters. Because workers are stateless, the rank's
  position captures every worker's: after `load_state_dict`, the next items are exactly those an
  uninterrupted run would have produced, whatever the number of workers. Any position is valid,
  also one inside a micro-batch: the first batch after a restore is then the rest of that
  micro-batch, and the later ones line up with the uninterrupted run's.
- **Another world size.** A state taken at a global-batch boundary (every training checkpoint is)
  restores on any number of ranks W' that divides `global_batch_size`: the global batches stay the
  same, only their split over ranks changes. A state inside a global batch, a different mixture or
  seed, or changed data (the fingerprint covers every source's manifest version) is refused with
  an error saying why; nothing is silently duplicated or skipped.
- **Bad items.** An item whose fetch or build raises (undecodable image, text too long, ...) is
  replaced by the next item of its source's stream, so batches keep their size and every rank its
  step count; each one is counted by reason. A worker that meets `max_consecutive_bad` bad items in
  a row stops the run, naming the last ones: that many is a broken dataset, not noise. A corrupt
  or missing shard (`xsam.data.shards.ShardError`) stops the run at once.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.utils.data

from xsam.data.mixture import MixtureSpec
from xsam.data.plan import ItemRef, PlanCache, RankLayout, SourceInfo, fingerprint, open_sources
from xsam.data.shards import DEFAULT_CACHE_BYTES, ShardCache, ShardError, ShardReader

STATE_FORMAT = "xsam-stream/1"
log = logging.getLogger(__name__)


class StateError(ValueError):
    """A loader state that does not fit this loader (other data, seed, batching or ranks)."""


@dataclass(frozen=True, slots=True)
class RawItem:
    """One planned item, before decoding: where it is and how to read its members."""

    source: SourceInfo
    ref: ItemRef
    record_key: str
    item_index: int
    reader: ShardReader

    @property
    def key(self) -> str:
        return f"{self.record_key}#{self.item_index}"

    def sample_json(self) -> bytes:
        return self.reader.read(self.ref.shard, self.record_key, "json")

    def member(self, ext: str) -> bytes:
        return self.reader.read(self.ref.shard, self.record_key, ext)


class ItemBuilder(Protocol):
    """What a loader does with each item (in a worker) and with each micro-batch."""

    def build(self, raw: RawItem) -> Any: ...

    def collate(self, samples: list[Any]) -> Any: ...

    # optional: `prepare()`, called in the loader's process before its workers start (fork
    # copies what it loaded, e.g. a tokenizer, instead of every worker loading it again)


class KeysOnly:
    """Builder that only names the items: `(source, item key)`; reads shard headers, no members."""

    def build(self, raw: RawItem) -> tuple[str, str]:
        return raw.source.name, raw.key

    def collate(self, samples: list[Any]) -> list[Any]:
        return samples


@dataclass(slots=True)
class _Envelope:
    """What a worker returns for one micro-batch."""

    payload: Any
    start: int
    stop: int
    sources: list[str]
    bad: list[tuple[str, str, str]]  # (source, item key, reason: "ExcType: message")
    truncated: int  # items whose text lost trailing turns to the length limit


class _RankEpoch(torch.utils.data.Dataset):
    """Map-style dataset whose i-th element is the i-th micro-batch of a rank from `start`."""

    def __init__(
        self,
        *,
        plans: PlanCache,
        layout: RankLayout,
        epoch: int,
        start: int,
        micro: int,
        builder: ItemBuilder,
        cache: ShardCache,
        max_consecutive_bad: int,
    ) -> None:
        self.plans, self.sources, self.layout = plans, plans.sources, layout
        self.epoch, self.start, self.micro = epoch, start, micro
        self.builder, self.max_bad = builder, max_consecutive_bad
        self.total = layout.per_rank * plans.epoch(epoch).global_batches
        # boundaries: the rest of a micro-batch a restore landed in, then whole micro-batches
        first = min(self.total, -(-start // micro) * micro) if start % micro else start
        self.bounds = ([start] if first > start else []) + list(range(first, self.total, micro)) + [self.total]
        # readers open files lazily, per process (they pickle without them)
        self.readers = [ShardReader(s, cache) for s in self.sources]
        self._consecutive: deque[tuple[str, str, str]] = deque(maxlen=max_consecutive_bad)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> _Envelope:
        plans, readers = self.plans, self.readers
        plan = plans.epoch(self.epoch)
        lo, hi = self.bounds[i], self.bounds[i + 1]
        samples, names, bad, truncated = [], [], [], 0
        for j in range(lo, hi):
            b, slot = self.layout.sample(j)
            src, pos = plan.batch(b)
            d, p = int(src[slot]), int(pos[slot])
            order, reader, source = plans.orders[d], readers[d], self.sources[d]
            for attempt in range(self.max_bad + 1):
                ref = order.locate(p + attempt)
                key = "?"
                try:
                    record_key, item_index = reader.locate(ref.shard, ref.item)
                    key = f"{record_key}#{item_index}"
                    sample = self.builder.build(RawItem(source, ref, record_key, item_index, reader))
                    samples.append(sample)
                    truncated += bool(getattr(sample, "truncated", False))
                    self._consecutive.clear()
                    break
                except ShardError:
                    raise
                except Exception as exc:  # a bad item: count it, take the next item of the source
                    failure = (source.name, key, f"{type(exc).__name__}: {exc}")
                    bad.append(failure)
                    self._consecutive.append(failure)
                    if len(self._consecutive) >= self.max_bad:
                        listing = "\n".join(f"  {s} {k}: {r}" for s, k, r in self._consecutive)
                        raise RuntimeError(
                            f"{self.max_bad} bad items in a row; the dataset is broken, not noisy."
                            f" Last ones:\n{listing}"
                        ) from exc
            names.append(source.name)
        return _Envelope(self.builder.collate(samples), lo, hi, names, bad, truncated)


def _identity(x: Any) -> Any:
    return x


@dataclass
class _Counters:
    samples: Counter = field(default_factory=Counter)  # per source
    bad: Counter = field(default_factory=Counter)  # per exception type
    recent_bad: list[tuple[str, str, str]] = field(default_factory=list)
    truncated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": dict(self.samples),
            "bad": dict(self.bad),
            "recent_bad": [list(x) for x in self.recent_bad],
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Counters:
        return cls(
            Counter(d.get("samples", {})),
            Counter(d.get("bad", {})),
            [tuple(x) for x in d.get("recent_bad", [])],
            int(d.get("truncated", 0)),
        )


class StreamLoader:
    """Rank `rank`'s batches of a mixture; iterate once per epoch.

    Args:
        spec: the mixture (`xsam.data.mixture.load_mixture`).
        world_size, rank: the data-parallel group; `batching.global_batch_size` must divide by it.
        num_workers: dataloader worker processes that fetch and build items (0: in this process).
        micro_batch_size: items per yielded batch; divides the rank's share of a global batch
            (default: the whole share, G / W). Smaller values serve gradient accumulation.
        builder: what to make of each item (default `KeysOnly`: the item keys, no decoding).
        epoch: the epoch to start at (a restored state overrides it).
        cache_dir, cache_bytes: local cache of remote shards and of verification marks.
        max_consecutive_bad: bad items in a row (per worker) that stop the run.
        prefetch_factor, multiprocessing_context: passed to torch's DataLoader.
        sources: already opened sources (tests, tools); default reads the manifests.
    """

    def __init__(
        self,
        spec: MixtureSpec,
        *,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        micro_batch_size: int | None = None,
        builder: ItemBuilder | None = None,
        epoch: int = 0,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_consecutive_bad: int = 16,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        sources: list[SourceInfo] | None = None,
    ) -> None:
        self.spec = spec
        self.sources = sources if sources is not None else open_sources(spec)
        self.fingerprint = fingerprint(spec, self.sources)
        self.layout = RankLayout(spec.batching.global_batch_size, world_size, rank)
        micro = micro_batch_size or self.layout.per_rank
        if micro < 1 or self.layout.per_rank % micro:
            raise ValueError(
                f"micro_batch_size {micro} must divide the rank's share of a global batch"
                f" ({spec.batching.global_batch_size} / {world_size} = {self.layout.per_rank})"
            )
        self.micro = micro
        self.builder: ItemBuilder = builder or KeysOnly()
        self.num_workers = num_workers
        self.cache = ShardCache(cache_dir, cache_bytes)
        self.max_consecutive_bad = max_consecutive_bad
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.epoch = epoch
        self.position = 0
        self.counters = _Counters()
        self._plans = PlanCache(spec, self.sources)
        self._plans.epoch(epoch)  # fail now on an unusable mixture (an empty source), not mid-training

    # ------------------------------------------------------------------------------ iteration

    def items_per_epoch(self, epoch: int | None = None) -> int:
        """Items this rank consumes in an epoch (the same on every rank)."""
        return self.layout.per_rank * self._plans.epoch(self.epoch if epoch is None else epoch).global_batches

    def __len__(self) -> int:
        """Micro-batches left in the current epoch."""
        left = self.items_per_epoch() - self.position
        return math.ceil(left / self.micro) if left > 0 else 0

    def __iter__(self) -> Iterator[Any]:
        dataset = _RankEpoch(
            plans=self._plans,
            layout=self.layout,
            epoch=self.epoch,
            start=self.position,
            micro=self.micro,
            builder=self.builder,
            cache=self.cache,
            max_consecutive_bad=self.max_consecutive_bad,
        )
        prepare = getattr(self.builder, "prepare", None)
        if prepare is not None:
            prepare()
        extra: dict[str, Any] = {}
        if self.num_workers:
            extra = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context}
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_identity, **extra
        )
        stats = self._plans.epoch(self.epoch).stats
        if self.position == 0:
            log.info(
                "rank %d/%d epoch %d: %d global batches of %d (%s); %d items padded, %d dropped",
                self.layout.rank, self.layout.world_size, self.epoch, stats.global_batches,
                self.spec.batching.global_batch_size,
                ", ".join(f"{name} {n}" for name, n in stats.items.items()), stats.padded, stats.dropped,
            )
        try:
            yield from self._consume(loader, dataset)
        finally:  # files this process opened (num_workers=0); workers' close when they exit
            for reader in dataset.readers:
                reader.close()

    def _consume(self, loader: torch.utils.data.DataLoader, dataset: _RankEpoch) -> Iterator[Any]:
        for env in loader:
            self.position = env.stop
            self.counters.samples.update(env.sources)
            self.counters.truncated += env.truncated
            for failure in env.bad:
                self.counters.bad[failure[2].split(":", 1)[0]] += 1
                log.warning("bad item %s of source %s replaced: %s", failure[1], failure[0], failure[2])
            self.counters.recent_bad = (self.counters.recent_bad + env.bad)[-20:]
            if self.position >= dataset.total:
                log.info(
                    "rank %d/%d epoch %d done: %s; %d bad items replaced, %d items truncated so far",
                    self.layout.rank, self.layout.world_size, self.epoch,
                    ", ".join(f"{k} {v}" for k, v in sorted(self.counters.samples.items())),
                    sum(self.counters.bad.values()), self.counters.truncated,
                )
                self.epoch += 1
                self.position = 0
            yield env.payload
        if self.position >= dataset.total:  # nothing was left: an empty epoch, or a state at its very end
            self.epoch += 1
            self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch, self.position = epoch, 0

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        per_rank = self.layout.per_rank
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "seed": self.spec.seed,
            "global_batch_size": self.spec.batching.global_batch_size,
            "world_size": self.layout.world_size,
            "rank": self.layout.rank,
            "epoch": self.epoch,
            "position": self.position,
            "global_step": self.position // per_rank,
            "at_global_batch_boundary": self.position % per_rank == 0,
            "counters": self.counters.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise StateError(f"not a loader state of format {STATE_FORMAT}: {state.get('format')!r}")
        if state["fingerprint"] != self.fingerprint:
            raise StateError(
                "the loader state belongs to another mixture: its seed, batching, shuffle buffer, sources or"
                " their data (manifest versions) differ. Resume with the mixture file and datasets it was"
                " saved with, or start this mixture from scratch"
            )
        same_ranks = state["world_size"] == self.layout.world_size
        if same_ranks and state["rank"] != self.layout.rank:
            raise StateError(f"the state is rank {state['rank']}'s; this loader is rank {self.layout.rank}")
        if same_ranks:
            self.position = int(state["position"])
        else:
            old_per_rank = state["global_batch_size"] // state["world_size"]
            if state["position"] % old_per_rank:
                raise StateError(
                    f"the state was saved inside a global batch (position {state['position']}, {old_per_rank} items"
                    f" per rank per step); it restores only on the same {state['world_size']} ranks"
                )
            self.position = int(state["position"]) // old_per_rank * self.layout.per_rank
        self.epoch = int(state["epoch"])
        self.counters = _Counters.from_dict(state.get("counters", {}))

    # -------------------------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, float]:
        """Numbers for the training log: this rank's items per source, bad items by reason, and
        (for the whole job, from the plan) how many passes over each source are complete."""
        plan = self._plans.epoch(self.epoch)
        step = min(self.position // self.layout.per_rank, plan.global_batches)
        before = plan.source_items_before(step)
        out: dict[str, float] = {
            "data/epoch": float(self.epoch),
            "data/epoch_progress": self.position / max(1, self.items_per_epoch()),
            "data/bad_items": float(sum(self.counters.bad.values())),
            "data/truncated_items": float(self.counters.truncated),
        }
        for d, source in enumerate(self.sources):
            consumed = self.epoch * plan.counts[source.name] + int(before[d])
            out[f"data/source_passes/{source.name}"] = consumed / source.items
            out[f"data/items/{source.name}"] = float(self.counters.samples.get(source.name, 0))
        for reason, n in self.counters.bad.items():
            out[f"data/bad/{reason}"] = float(n)
        return out


def plan_summary(spec: MixtureSpec, sources: list[SourceInfo], epoch: int = 0) -> dict[str, Any]:
    """Per-source items per epoch, pass factors and shares: what `xsam data mix --dry-run` prints."""
    plans = PlanCache(spec, sources)
    plan = plans.epoch(epoch)
    g = spec.batching.global_batch_size
    total = sum(plan.counts.values())
    rows = []
    for source in sources:
        n = plan.counts[source.name]
        rows.append(
            {
                "name": source.name,
                "path": source.spec.path,
                "tasks": source.tasks,
                "items": source.items,
                "epoch_items": n,
                "passes": n / source.items,
                "share": n / total if total else 0.0,
                "per_batch": g * n / total if total else 0.0,
                "grouped_batches": -(-n // g) if spec.batching.remainder == "pad" else n // g,
            }
        )
    return {
        "mode": spec.mix_mode,
        "batching": spec.batching.model_dump(),
        "epoch_items": total,
        "global_batches": plan.global_batches,
        "padded": plan.stats.padded,
        "dropped": plan.stats.dropped,
        "sources": rows,
    }


def mixed_source_counts(spec: MixtureSpec, sources: list[SourceInfo], epoch: int, first: int) -> dict[str, int]:
    """Items per source among the first `first` planned items of an epoch (all ranks, in global
    batch order): how tests and tools check mixing proportions without reading a shard."""
    plan = PlanCache(spec, sources).epoch(epoch)
    g = spec.batching.global_batch_size
    counts = np.zeros(len(sources), dtype=np.int64)
    for b in range(min(plan.global_batches, -(-first // g))):
        src, _ = plan.batch(b)
        take = src[: max(0, min(g, first - b * g))]
        np.add.at(counts, take, 1)
    return {s.name: int(c) for s, c in zip(sources, counts, strict=True)}

