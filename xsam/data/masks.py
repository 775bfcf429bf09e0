"""Mask <-> COCO compressed RLE, the one mask encoding of the sample contract (lossless)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from xsam.data.schema import RLE


def encode(mask: np.ndarray) -> RLE:
    """Encode a 2-D boolean/0-1 mask (H, W) as compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return RLE(size=(int(rle["size"][0]), int(rle["size"][1])), counts=rle["counts"].decode("ascii"))


def decode(rle: RLE | dict) -> np.ndarray:
    """Decode compressed RLE (model or COCO dict) to a boolean (H, W) array."""
    coco = to_coco(rle)
    return mask_utils.decode(coco).astype(bool)


def to_coco(rle: RLE | dict) -> dict:
    """The pycocotools form: {"size": [h, w], "counts": bytes}."""
    if isinstance(rle, RLE):
        size, counts = list(rle.size), rle.counts
    else:
        size, counts = list(rle["size"]), rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def from_coco(rle: dict) -> RLE:
    """Normalise a COCO RLE dict (compressed or uncompressed counts) to the contract's RLE."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO crowd annotations)
        counts = mask_utils.frPyObjects(rle, h, w)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return RLE(size=(h, w), counts=counts)


def area(rle: RLE) -> int:
    return int(mask_utils.area(to_coco(rle)))


def bbox(rle: RLE) -> tuple[float, float, float, float]:
    x, y, w, h = mask_utils.toBbox(to_coco(rle)).tolist()
    return (float(x), float(y), float(w), float(h))


def union(rles: list[RLE], height: int, width: int) -> RLE:
    """OR of several masks (an all-zero mask when the list is empty)."""
    if not rles:
        return encode(np.zeros((height, width), dtype=bool))
    merged = mask_utils.merge([to_coco(r) for r in rles], intersect=False)
    return RLE(size=(height, width), counts=merged["counts"].decode("ascii"))
