"""What the model consumes: one `Sample` per item (built in a loader worker), the compact
`PackedBatch` a loader yields, and the dense `Batch` that `PackedBatch.to(device)` makes.

Why two batch types: at the paper's sizes a dense item is ~45 MB (30 target masks at 1024² and a
float32 1024² image), and moving that from a dataloader worker into shared memory costs as much
CPU as building it (benchmarks/loader.py). A `PackedBatch` holds only numpy arrays (a worker hands
them over by value through its pipe; each torch tensor would cost a shared-memory segment of its
own): the uint8 resized images (for SAM only the valid window, no padding) and the masks
bit-packed at the images' own resolution, ~10x fewer bytes. `.to(device)` copies them and then
normalises, pads and resamples ON the device, bit-identical to the dense path
(`xsam.data.transforms`).

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
from dataclasses import dataclass

import numpy as np
import torch

from xsam.data.transforms import Geometry, MaskStack, PreprocessConfig, normalize
from xsam.text.tokens import IGNORE_INDEX


@dataclass(kw_only=True, slots=True)
class Sample:
    """One decoded, preprocessed and tokenised item, compact (see the module docstring)."""

    key: str
    source: str
    task: str
    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    cond_ids: np.ndarray  # [L] int64
    seg_ids: np.ndarray  # [L] int64
    image: np.ndarray | None  # uint8 [V, V, 3] SigLIP input before normalisation; None: text-only
    seg_window: np.ndarray | None  # uint8 [h, w, 3] the valid part of the SAM canvas (scaled_size)
    geometry: Geometry | None
    masks: MaskStack | None  # N targets (None without an image)
    mask_spans: np.ndarray  # [N] int64
    mask_segs: np.ndarray  # [N] int64
    ignore: MaskStack | None  # 1 mask, or None
    regions: MaskStack | None  # the item's own visual prompts, R_own masks
    region_slots: np.ndarray  # [R_own] int64: which <region> occurrence each own prompt fills
    num_regions: int  # <region> sentinels in input_ids (own prompts + negatives)
    truncated: bool = False


@dataclass(kw_only=True, slots=True)
class Batch:
    """A dense, padded micro-batch on one device (see the module docstring for the conventions)."""

    keys: list[str]
    sources: list[str]
    tasks: list[str]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B, L]
    cond_ids: torch.Tensor  # [B, L]
    seg_ids: torch.Tensor  # [B, L]
    has_image: torch.Tensor  # [B] bool
    pixel_values: torch.Tensor  # [B, 3, V, V] float32, normalised (zeros where no image)
    seg_pixel_values: torch.Tensor  # [B, 3, S, S] float32, normalised, zero padding
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


@dataclass(kw_only=True, slots=True)
class PackedBatch:
    """What a loader yields: numpy only; text padded, images uint8, masks bit-packed.
    `.to(device)` -> `Batch`.

    `region_refs[b]` has one row per `<region>` of sample b: (owner, row, quarter): the region is
    row `row` of sample `owner`'s own prompts, or, when `row` is -1, quarter `quarter` of
    `owner`'s image (a VGD negative in a micro-batch where no other sample has prompts).
    """

    keys: list[str]
    sources: list[str]
    tasks: list[str]
    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] bool
    labels: np.ndarray
    cond_ids: np.ndarray
    seg_ids: np.ndarray
    has_image: np.ndarray  # [B] bool
    images: np.ndarray  # uint8 [B, V, V, 3]
    seg_windows: list[np.ndarray | None]  # B x uint8 [h_b, w_b, 3]
    image_sizes: np.ndarray  # [B, 2] int64
    scaled_sizes: np.ndarray  # [B, 2] int64
    geometries: list[Geometry | None]
    masks: list[MaskStack | None]
    mask_spans: list[np.ndarray]
    mask_segs: list[np.ndarray]
    ignore: list[MaskStack | None]
    regions: list[MaskStack | None]
    region_refs: list[np.ndarray]  # B x [R_b, 3] int64
    truncated: int
    preprocess: PreprocessConfig

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str = "cpu", non_blocking: bool = False) -> Batch:
        """Copy to `device`, then normalise and pad the images and expand the masks there."""

        def move(x: np.ndarray) -> torch.Tensor:
            # arrays straight from PIL are read-only (only without workers; unpickled ones are not)
            return torch.from_numpy(x if x.flags.writeable else x.copy()).to(device, non_blocking=non_blocking)

        cfg, n = self.preprocess, len(self)
        s = cfg.seg_size
        seg = torch.zeros((n, 3, s, s), dtype=torch.float32, device=device)
        for b, window in enumerate(self.seg_windows):
            if window is not None:
                h, w = window.shape[:2]
                seg[b, :, :h, :w] = normalize(move(window).permute(2, 0, 1), cfg.seg_mean, cfg.seg_std)
        has_image = move(self.has_image)
        pixel_values = normalize(move(self.images).permute(0, 3, 1, 2), cfg.vision_mean, cfg.vision_std)
        pixel_values[~has_image] = 0
        empty = torch.zeros((0, s, s), dtype=torch.bool, device=device)
        dense = [m.dense(device) if m is not None else empty for m in self.masks]
        own = [r.dense(device) if r is not None else empty for r in self.regions]
        ignore = torch.zeros((n, s, s), dtype=torch.bool, device=device)
        for b, m in enumerate(self.ignore):
            if m is not None:
                ignore[b] = m.dense(device)[0]
        regions = []
        for refs in self.region_refs:
            out = torch.zeros((len(refs), s, s), dtype=torch.bool, device=device)
            for i, (owner, row, quarter) in enumerate(refs.tolist()):
                if row >= 0:
                    out[i] = own[owner][row]
                else:
                    out[i] = _quarter(self.scaled_sizes[owner].tolist(), s, quarter, device)
            regions.append(out)
        return Batch(
            keys=self.keys, sources=self.sources, tasks=self.tasks,
            input_ids=move(self.input_ids), attention_mask=move(self.attention_mask), labels=move(self.labels),
            cond_ids=move(self.cond_ids), seg_ids=move(self.seg_ids), has_image=has_image,
            pixel_values=pixel_values, seg_pixel_values=seg, image_sizes=move(self.image_sizes),
            scaled_sizes=move(self.scaled_sizes), geometries=self.geometries, masks=dense,
            mask_spans=[move(x) for x in self.mask_spans], mask_segs=[move(x) for x in self.mask_segs],
            ignore=ignore, regions=regions, region_sources=[move(np.ascontiguousarray(r[:, 0])) for r in self.region_refs],
            truncated=self.truncated,
        )


def collate(samples: list[Sample], *, pad_id: int, preprocess: PreprocessConfig, seed: int = 0) -> PackedBatch:
    """Pad the texts (right), stack the uint8 SigLIP images, and resolve VGD negative regions.

    A negative `<region>` takes a visual prompt of another sample of the batch (drawn with a rng
    seeded by the item keys, so the choice is reproducible); with no other sample holding prompts
    it takes a random quarter of another sample's image, and only in a micro-batch with no other
    image at all a quarter of the sample's own image.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    n = len(samples)
    length = max(len(x.input_ids) for x in samples)
    v = preprocess.vision_size

    def pad(name: str, value: int) -> np.ndarray:
        out = np.full((n, length), value, dtype=np.int64)
        for b, x in enumerate(samples):
            t = getattr(x, name)
            out[b, : len(t)] = t
        return out

    attention = np.zeros((n, length), dtype=bool)
    images = np.zeros((n, v, v, 3), dtype=np.uint8)
    image_sizes = np.zeros((n, 2), dtype=np.int64)
    scaled_sizes = np.zeros((n, 2), dtype=np.int64)
    for b, x in enumerate(samples):
        attention[b, : len(x.input_ids)] = True
        if x.image is not None and x.geometry is not None:
            images[b] = x.image
            image_sizes[b] = x.geometry.original_size
            scaled_sizes[b] = x.geometry.scaled_size
    return PackedBatch(
        keys=[x.key for x in samples],
        sources=[x.source for x in samples],
        tasks=[x.task for x in samples],
        input_ids=pad("input_ids", pad_id),
        attention_mask=attention,
        labels=pad("labels", IGNORE_INDEX),
        cond_ids=pad("cond_ids", -1),
        seg_ids=pad("seg_ids", -1),
        has_image=np.array([x.image is not None for x in samples], dtype=bool),
        images=images,
        seg_windows=[x.seg_window for x in samples],
        image_sizes=image_sizes,
        scaled_sizes=scaled_sizes,
        geometries=[x.geometry for x in samples],
        masks=[x.masks for x in samples],
        mask_spans=[x.mask_spans for x in samples],
        mask_segs=[x.mask_segs for x in samples],
        ignore=[x.ignore for x in samples],
        regions=[x.regions for x in samples],
        region_refs=_region_refs(samples, seed),
        truncated=sum(x.truncated for x in samples),
        preprocess=preprocess,
    )


def _region_refs(samples: list[Sample], seed: int) -> list[np.ndarray]:
    out = []
    for b, x in enumerate(samples):
        refs = np.full((x.num_regions, 3), -1, dtype=np.int64)
        refs[:, 0] = b
        for row, slot in enumerate(x.region_slots.tolist()):
            refs[slot, 1] = row
        negatives = [i for i in range(x.num_regions) if refs[i, 1] < 0]
        if negatives:
            rng = random.Random(f"{seed}|{x.key}|{'|'.join(y.key for y in samples)}")
            donors = [d for d, y in enumerate(samples) if d != b and y.regions is not None and len(y.regions)]
            images = [d for d, y in enumerate(samples) if d != b and y.geometry is not None]
            for i in negatives:
                if donors:
                    d = rng.choice(donors)
                    refs[i, 0], refs[i, 1] = d, rng.randrange(len(samples[d].regions))
                else:
                    refs[i, 0] = rng.choice(images) if images else b
                    refs[i, 2] = rng.randrange(4)
        out.append(refs)
    return out


def _quarter(scaled_size: list[int], seg_size: int, quarter: int, device: torch.device | str) -> torch.Tensor:
    """Quarter `quarter` (0..3, row-major) of an image's valid area: a region for "somewhere else"."""
    box = torch.zeros((seg_size, seg_size), dtype=torch.bool, device=device)
    h, w = scaled_size
    y, x = (quarter // 2) * (h // 2), (quarter % 2) * (w // 2)
    box[y : y + max(1, h // 2), x : x + max(1, w // 2)] = True
    return box
