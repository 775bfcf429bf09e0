"""What the model consumes: one `Sample` per item (built in a loader worker) and the padded `Batch`.

Text follows the spec's conventions (§1.1): `input_ids` hold the sentinels -200 (`<image>`) and
-300 (`<region>`) where the model splices visual features; `labels` are -100 except on answer tokens;
`cond_ids[t] = k` over the k-th `<p>...</p>` span (both delimiters included), `seg_ids[t] = j` at
the j-th `<SEG>`, -1 elsewhere.

Masks. Each row of `masks` is one target of one `<SEG>`: `mask_segs` says which `<SEG>` (its
index j), `mask_spans` which span classifies it (its index k, the class the decoder must predict).
On the paper branch every `<SEG>` is its own decoder instance (§8), so a multi-turn RefCOCO item
has one row per turn; a genseg item has one `<SEG>` with one row per non-crowd segment; a gRefCOCO
no-target turn has a `<SEG>` with no row. Masks, `ignore` and `regions` are at the seg input's
resolution and geometry (`seg_size` square, padding False / not ignored; `scaled_sizes` gives
the valid part).

Regions. `regions[b]` holds one mask per `<region>` sentinel of sample b, in text order, and
`region_sources[b]` the batch index of the image whose features that region pools: its own for
a visual prompt, another sample's for a VGD negative (spec §8: negative regions come from other
samples of the batch; `collate` picks them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

import torch

from xsam.data.transforms import Geometry
from xsam.text.tokens import IGNORE_INDEX


@dataclass(kw_only=True, slots=True)
class Sample:
    """One decoded, preprocessed and tokenised item."""

    key: str
    source: str
    task: str
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long
    cond_ids: torch.Tensor  # [L] long
    seg_ids: torch.Tensor  # [L] long
    pixel_values: torch.Tensor | None  # [3, V, V]; None for a text-only chat item
    seg_pixel_values: torch.Tensor | None  # [3, S, S]
    geometry: Geometry | None
    masks: torch.Tensor  # [N, S, S] bool
    mask_spans: torch.Tensor  # [N] long
    mask_segs: torch.Tensor  # [N] long
    ignore: torch.Tensor | None  # [S, S] bool
    regions: torch.Tensor  # [R, S, S] bool, R = own visual prompts (negatives excluded)
    region_slots: torch.Tensor  # [R] long: which <region> occurrence each own prompt fills
    num_regions: int  # <region> sentinels in input_ids (own prompts + negatives)
    truncated: bool = False


@dataclass(kw_only=True, slots=True)
class Batch:
    """A padded micro-batch (see the module docstring for the conventions)."""

    keys: list[str]
    sources: list[str]
    tasks: list[str]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B, L]
    cond_ids: torch.Tensor  # [B, L]
    seg_ids: torch.Tensor  # [B, L]
    has_image: torch.Tensor  # [B] bool
    pixel_values: torch.Tensor  # [B, 3, V, V] (zeros where no image)
    seg_pixel_values: torch.Tensor  # [B, 3, S, S]
    image_sizes: torch.Tensor  # [B, 2] original (h, w); 0 where no image
    scaled_sizes: torch.Tensor  # [B, 2] valid (h, w) in the seg canvas
    geometries: list[Geometry | None]
    masks: list[torch.Tensor]  # B x [N_b, S, S] bool
    mask_spans: list[torch.Tensor]  # B x [N_b]
    mask_segs: list[torch.Tensor]  # B x [N_b]
    ignore: torch.Tensor  # [B, S, S] bool
    regions: list[torch.Tensor]  # B x [R_b, S, S] bool, in <region> order
    region_sources: list[torch.Tensor]  # B x [R_b]: batch index of the image each region pools
    truncated: int  # items whose text lost trailing turns to the length limit

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def collate(samples: list[Sample], *, pad_id: int, vision_size: int, seg_size: int, seed: int = 0) -> Batch:
    """Pad the texts (right), stack the images, and resolve VGD negative regions from other samples.

    A negative `<region>` takes a visual prompt of another sample of the batch (drawn with a rng
    seeded by the item keys, so the choice is reproducible); with no other sample holding prompts
    it takes a random quarter of another sample's image, and only in a micro-batch with no other
    image at all a quarter of the sample's own image.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    n = len(samples)
    length = max(len(s.input_ids) for s in samples)

    def pad(name: str, value: int) -> torch.Tensor:
        out = torch.full((n, length), value, dtype=torch.long)
        for b, s in enumerate(samples):
            t = getattr(s, name)
            out[b, : len(t)] = t
        return out

    attention = torch.zeros((n, length), dtype=torch.bool)
    for b, s in enumerate(samples):
        attention[b, : len(s.input_ids)] = True
    pixel_values = torch.zeros((n, 3, vision_size, vision_size))
    seg_pixel_values = torch.zeros((n, 3, seg_size, seg_size))
    ignore = torch.zeros((n, seg_size, seg_size), dtype=torch.bool)
    image_sizes = torch.zeros((n, 2), dtype=torch.long)
    scaled_sizes = torch.zeros((n, 2), dtype=torch.long)
    for b, s in enumerate(samples):
        if s.pixel_values is not None and s.seg_pixel_values is not None and s.geometry is not None:
            pixel_values[b] = s.pixel_values
            seg_pixel_values[b] = s.seg_pixel_values
            image_sizes[b] = torch.tensor(s.geometry.original_size)
            scaled_sizes[b] = torch.tensor(s.geometry.scaled_size)
        if s.ignore is not None:
            ignore[b] = s.ignore
    regions, region_sources = _resolve_regions(samples, seg_size, seed)
    return Batch(
        keys=[s.key for s in samples],
        sources=[s.source for s in samples],
        tasks=[s.task for s in samples],
        input_ids=pad("input_ids", pad_id),
        attention_mask=attention,
        labels=pad("labels", IGNORE_INDEX),
        cond_ids=pad("cond_ids", -1),
        seg_ids=pad("seg_ids", -1),
        has_image=torch.tensor([s.pixel_values is not None for s in samples]),
        pixel_values=pixel_values,
        seg_pixel_values=seg_pixel_values,
        image_sizes=image_sizes,
        scaled_sizes=scaled_sizes,
        geometries=[s.geometry for s in samples],
        masks=[s.masks for s in samples],
        mask_spans=[s.mask_spans for s in samples],
        mask_segs=[s.mask_segs for s in samples],
        ignore=ignore,
        regions=regions,
        region_sources=region_sources,
        truncated=sum(s.truncated for s in samples),
    )


def _resolve_regions(samples: list[Sample], seg_size: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    regions, sources = [], []
    for b, s in enumerate(samples):
        out = torch.zeros((s.num_regions, seg_size, seg_size), dtype=torch.bool)
        src = torch.full((s.num_regions,), b, dtype=torch.long)
        if len(s.region_slots):
            out[s.region_slots] = s.regions
        own = set(s.region_slots.tolist())
        negatives = [i for i in range(s.num_regions) if i not in own]
        if negatives:
            rng = random.Random(f"{seed}|{s.key}|{'|'.join(x.key for x in samples)}")
            donors = [d for d, x in enumerate(samples) if d != b and len(x.regions)]
            images = [d for d, x in enumerate(samples) if d != b and x.geometry is not None]
            for i in negatives:
                if donors:
                    d = rng.choice(donors)
                    out[i] = samples[d].regions[rng.randrange(len(samples[d].regions))]
                    src[i] = d
                else:
                    d = rng.choice(images) if images else b
                    out[i] = _quarter_box(samples[d].geometry, seg_size, rng)
                    src[i] = d
        regions.append(out)
        sources.append(src)
    return regions, sources


def _quarter_box(geometry: Geometry | None, seg_size: int, rng: random.Random) -> torch.Tensor:
    """One random quarter of an image's valid area: a region that stands for 'somewhere else'."""
    box = torch.zeros((seg_size, seg_size), dtype=torch.bool)
    h, w = geometry.scaled_size if geometry is not None else (seg_size, seg_size)
    y, x = rng.randrange(2) * (h // 2), rng.randrange(2) * (w // 2)
    box[y : y + max(1, h // 2), x : x + max(1, w // 2)] = True
    return box
