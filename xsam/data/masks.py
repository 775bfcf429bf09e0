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


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-major (COCO order) runs of a label map: (starts, lengths, values)."""
    flat = np.asarray(labels).ravel(order="F")
    if flat.size == 0:
        raise ValueError("empty label map")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return starts, lengths, flat[starts]


def _rle_from_runs(starts: np.ndarray, lengths: np.ndarray, total: int, height: int, width: int) -> RLE:
    """Compressed RLE of the union of the given (sorted, disjoint) foreground runs."""
    if starts.size:
        ends = starts + lengths
        # merge runs that touch (adjacent runs of two labels that are both selected)
        keep = np.concatenate(([True], starts[1:] != ends[:-1]))
        group = np.cumsum(keep) - 1
        m_starts = starts[keep]
        m_ends = np.zeros(m_starts.size, dtype=np.int64)
        np.maximum.at(m_ends, group, ends)
        gaps = m_starts - np.concatenate(([0], m_ends[:-1]))
        counts = np.empty(2 * m_starts.size, dtype=np.int64)
        counts[0::2], counts[1::2] = gaps, m_ends - m_starts
        tail = total - int(m_ends[-1])
        values = counts.tolist() + ([tail] if tail else [])
    else:
        values = [total]
    compressed = mask_utils.frPyObjects({"size": [height, width], "counts": values}, height, width)
    return RLE(size=(height, width), counts=compressed["counts"].decode("ascii"))


def encode_labels(labels: np.ndarray, groups: dict[object, list[int]]) -> dict[object, RLE]:
    """RLE of `labels` in each of `groups` (name -> label values), from ONE pass over the map.

    Equal, byte for byte, to `encode(np.isin(labels, values))` per group, but a panoptic PNG with 30
    segments costs one run-length pass instead of 30 full-frame comparisons and encodes.
    """
    height, width = labels.shape
    starts, lengths, values = _runs(labels)
    order = np.argsort(values, kind="stable")  # runs of each label stay in position order
    sorted_values = values[order]
    out: dict[object, RLE] = {}
    for name, wanted in groups.items():
        pick = []
        for value in wanted:
            lo = np.searchsorted(sorted_values, value, side="left")
            hi = np.searchsorted(sorted_values, value, side="right")
            pick.append(order[lo:hi])
        idx = np.sort(np.concatenate(pick)) if pick else np.zeros(0, dtype=np.int64)
        out[name] = _rle_from_runs(starts[idx], lengths[idx], labels.size, height, width)
    return out


def label_values(labels: np.ndarray) -> set[int]:
    """The distinct values of a label map (via its runs: cheaper than np.unique on a full frame)."""
    return set(_runs(labels)[2].tolist())
