"""The mixture spec: which dataset folders a training stage reads, and how much of each per epoch.

A mixture file is YAML, loaded with `yaml.safe_load` and validated here (unknown keys rejected):

```yaml
seed: 1234
oversample_ratio: 0.1                 # X-SAM's t, used by `repeat: sqrt`
batching: {mode: mixed, global_batch_size: 8}      # or mode: source_grouped
sources:
  - {name: coco, path: data/coco-panoptic, weight: 2.0}
  - {name: refcoco, path: s3://bucket/refcoco, repeat: sqrt}
  - {name: gcg, path: data/gcg, repetitions: 2}
```

Every source uses ONE of three ways to say how many of its items an epoch holds, and a file uses
one way for all its sources (mixing them has no single meaning, so it is rejected):

- `weight: w`: the epoch holds `epoch_items` items (default: the sum of the sources' items),
  split between sources in proportion to their weights (largest-remainder rounding, so the counts
  are exact and sum to `epoch_items`);
- `repeat: sqrt`: X-SAM's repeat factor (spec §2.3, `concat_dataset.py`): with N_d the source's
  items and f_d = N_d / sum(N), r_d = max(1, sqrt(t / f_d)) for t = `oversample_ratio`, and the
  epoch holds int(N_d * r_d) items of the source. It only ever up-samples small sources;
- `repetitions: k`: the epoch holds int(N_d * k) items (k = 2: every item twice; 0.5: half).

Counts are in ITEMS (the sample contract: a record renders one or more items; the manifest counts
them). A source that needs more items than it has continues into its next pass, with a new
order; one that needs fewer continues where it stopped in the next epoch (see `xsam.data.plan`).

`splits: [train]` restricts a source to records of those upstream splits (a RefCOCO folder holds
train, val, testA and testB); sizes are then counted over the selected items only.

Relative `path`s are resolved against the current working directory when the file is loaded, so a
mixture file means the same on every rank and Ray worker once loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xsam.configio import format_validation, read_yaml

MixMode = Literal["weight", "repeat", "repetitions"]


class MixtureError(ValueError):
    """A mixture file that cannot be used; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """One dataset folder of the mixture."""

    name: str = Field(description="short unique name, used in keys, logs and metrics")
    path: str = Field(description="a complete dataset folder (local path or s3://bucket/prefix)")
    weight: float | None = Field(default=None, gt=0, description="share of the epoch (weights mode)")
    repeat: Literal["sqrt"] | None = Field(default=None, description="X-SAM's repeat factor (sqrt mode)")
    repetitions: float | None = Field(default=None, gt=0, description="passes over the source per epoch")
    splits: list[str] | None = Field(
        default=None,
        min_length=1,
        description="use only records of these upstream splits (e.g. [train]); default: every record",
    )

    @field_validator("name")
    @classmethod
    def _name_chars(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"source name {name!r} may only use letters, digits and _ . + -")
        return name

    @model_validator(mode="after")
    def _one_way(self) -> SourceSpec:
        given = [k for k in ("weight", "repeat", "repetitions") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"source {self.name!r} must set exactly one of weight, repeat: sqrt, repetitions"
                f" (it sets {', '.join(given) or 'none'})"
            )
        return self

    @property
    def mix_mode(self) -> MixMode:
        if self.weight is not None:
            return "weight"
        return "repeat" if self.repeat is not None else "repetitions"


class BatchingSpec(_Strict):
    """How items become global batches (one optimizer step over all ranks)."""

    mode: Literal["mixed", "source_grouped"] = Field(
        default="mixed",
        description="mixed: any sources in a batch; source_grouped: one source per global batch (X-SAM's sampler)",
    )
    global_batch_size: int = Field(ge=1, description="items per optimizer step over all ranks")
    remainder: Literal["pad", "drop"] = Field(
        default="pad",
        description="an incomplete last batch (of the epoch, or of a source when grouped) is padded"
        " with the items just before it (X-SAM) or dropped; either way counted",
    )
    group_by_length: bool = Field(
        default=False,
        description="sort items by text length within windows of `length_window` global batches, so"
        " a batch holds similar lengths (less padding); reads each source's index.parquet once",
    )
    length_window: int = Field(default=16, ge=1, description="global batches per length-sorting window")


class MixtureSpec(_Strict):
    """A whole mixture file."""

    seed: int = Field(description="with the epoch, fixes every order, template and augmentation")
    oversample_ratio: float = Field(default=0.1, gt=0, description="X-SAM's t for `repeat: sqrt`")
    epoch_items: int | None = Field(default=None, ge=1, description="weights mode: items per epoch")
    shuffle_buffer: int = Field(
        default=4096,
        ge=1,
        description="items shuffled together (a window over the shard-order stream): larger mixes more"
        " shards into every stretch of training, and readers keep more shards open",
    )
    batching: BatchingSpec
    sources: list[SourceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> MixtureSpec:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique: {', '.join(dupes)} repeated")
        modes: dict[str, list[str]] = {}
        for s in self.sources:
            modes.setdefault(s.mix_mode, []).append(s.name)
        if len(modes) > 1:
            used = "; ".join(f"{_MODE_KEY[m]}: {', '.join(n)}" for m, n in modes.items())
            raise ValueError(
                f"a mixture file uses one way to size its sources, this one mixes them ({used}):"
                " give every source a weight, or every source `repeat: sqrt`, or every source `repetitions`"
            )
        if self.epoch_items is not None and self.mix_mode != "weight":
            raise ValueError("epoch_items only applies when the sources have weights")
        return self

    @property
    def mix_mode(self) -> MixMode:
        return self.sources[0].mix_mode


_MODE_KEY = {"weight": "weight", "repeat": "repeat: sqrt", "repetitions": "repetitions"}


def parse_mixture(doc: Any, *, source: str = "<mixture>", base: str | Path | None = None) -> MixtureSpec:
    """Validate a parsed mixture document; relative paths are made absolute against `base` (a folder
    or an `s3://bucket/prefix`; default: the current working directory)."""
    if not isinstance(doc, dict):
        raise MixtureError(f"mixture file {source}: expected a mapping with seed, batching and sources")
    try:
        spec = MixtureSpec.model_validate(doc)
    except ValidationError as exc:
        raise MixtureError(f"mixture file {source} is not valid:\n{format_validation(exc)}") from None
    if isinstance(base, str) and "://" in base:
        def join(path: str) -> str:
            return f"{base.rstrip('/')}/{path}"
    else:
        folder = Path(base or Path.cwd()).resolve()

        def join(path: str) -> str:
            return str(folder / path)
    sources = [
        s if "://" in s.path or Path(s.path).is_absolute() else s.model_copy(update={"path": join(s.path)})
        for s in spec.sources
    ]
    return spec.model_copy(update={"sources": sources})


def load_mixture(path: str | Path) -> MixtureSpec:
    """Read and validate a mixture YAML file (never executes anything in it)."""
    path = Path(path)
    doc = read_yaml(path, error=MixtureError, what="mixture file")
    return parse_mixture(doc, source=str(path))


def epoch_counts(spec: MixtureSpec, sizes: dict[str, int]) -> dict[str, int]:
    """Items of each source in one epoch, given each source's item count (in spec order)."""
    for s in spec.sources:
        if sizes.get(s.name, 0) < 1:
            which = f" of splits {', '.join(s.splits)}" if s.splits else ""
            raise MixtureError(f"source {s.name!r} ({s.path}) has no items{which}: it cannot be mixed")
    total = sum(sizes[s.name] for s in spec.sources)
    if spec.mix_mode == "weight":
        target = spec.epoch_items or total
        wsum = sum(s.weight or 0.0 for s in spec.sources)
        exact = [target * (s.weight or 0.0) / wsum for s in spec.sources]
        counts = [math.floor(x) for x in exact]
        # largest remainder: the counts sum to exactly `target`; ties go to the earlier source
        order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
        for i in order[: target - sum(counts)]:
            counts[i] += 1
        return {s.name: c for s, c in zip(spec.sources, counts, strict=True)}
    if spec.mix_mode == "repeat":
        out = {}
        for s in spec.sources:
            n = sizes[s.name]
            factor = max(1.0, math.sqrt(spec.oversample_ratio / (n / total)))
            out[s.name] = int(n * factor)
        return out
    return {s.name: int(sizes[s.name] * (s.repetitions or 0.0)) for s in spec.sources}
