"""Mask <-> COCO compressed RLE, the one mask encoding of the sample contract (lossless)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from xsam.data.schema import RLE, checked_model

def make_rle(height: Any, width: Any, counts: Any) -> RLE:
    """`RLE(size=(height, width), counts=counts)`, skipping the validation pass when the values are
    already what it would store (exact `int`s, a `str`); anything else is validated as before."""
    if type(height) is int and type(width) is int and type(counts) is str:
        return checked_model(RLE, {"size": (height, width), "counts": counts})
    return RLE(size=(height, width), counts=counts)


def encode(mask: np.ndarray) -> RLE:
    """Encode a 2-D boolean/0-1 mask (H, W) as compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return make_rle(int(rle["size"][0]), int(rle["size"][1]), rle["counts"].decode("ascii"))


def encode_json(mask: np.ndarray) -> dict:
    """`encode`, as the JSON object prediction files hold: {"size": [h, w], "counts": str}."""
    rle = encode(mask)
    return {"size": list(rle.size), "counts": rle.counts}


def decode(rle: RLE | dict) -> np.ndarray:
    """Decode compressed RLE (model or COCO dict) to a boolean (H, W) array.

    The runs are checked first (`counts_problems`): pycocotools fills a mask whose runs fall short
    of H x W from uninitialised memory, different on every call, so such an RLE raises ValueError."""
    coco = to_coco(rle)
    h, w = (int(v) for v in coco["size"])
    problem = counts_problems([coco["counts"]], h * w)[0]
    if problem is not None:
        raise ValueError(f"RLE of size [{h}, {w}] does not decode: {problem}")
    return mask_utils.decode(coco).astype(bool)


_MAX_GROUP = 7  # 6-bit characters per run value: 7 x 5 bits = 35 bits, far above any real run


def rle_counts(counts: str | bytes) -> np.ndarray:
    """A COCO compressed counts string -> its run lengths (int64); ValueError if malformed.

    The arithmetic of pycocotools' `rleFrString` (6-bit characters from '0': 0x20 = another
    character follows, 0x10 = sign, 5 value bits each; runs from the third on are deltas to the run
    two before), vectorised."""
    runs, _, problems = _scan([counts])
    if 0 in problems:
        raise ValueError(problems[0])
    return runs


def counts_problems(counts: list[str | bytes], pixels: int) -> list[str | None]:
    """For each compressed counts string: None when it is well formed with non-negative runs that
    cover exactly `pixels` (= H x W), else what is wrong. One vectorised pass over all the strings
    (a record's masks at once), Python work only for the bad ones."""
    runs, string, problems = _scan(counts)
    out: list[str | None] = [problems.get(i) for i in range(len(counts))]
    totals = np.zeros(len(counts), dtype=np.int64)
    lowest = np.zeros(len(counts), dtype=np.int64)
    if runs.size:
        first = np.flatnonzero(np.concatenate(([True], string[1:] != string[:-1])))
        totals[string[first]] = np.add.reduceat(runs, first)
        lowest[string[first]] = np.minimum.reduceat(runs, first)
    for i in np.flatnonzero((totals != pixels) | (lowest < 0)).tolist():
        if out[i] is None:
            out[i] = (f"RLE has a negative run ({int(lowest[i])})" if lowest[i] < 0
                      else f"RLE runs cover {int(totals[i])} pixels, the mask has {pixels}")
    return out


def _scan(counts: list[str | bytes]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(run lengths of all well-formed strings one after another, the string index of each run,
    {string index: what is wrong} for the malformed ones, whose runs are left out)."""
    blobs = [c.encode("ascii", errors="replace") if isinstance(c, str) else bytes(c) for c in counts]
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.int64) - 48
    owner = np.repeat(np.arange(len(blobs)), lengths)  # string of each character
    begin = np.cumsum(lengths) - lengths
    problems: dict[int, str] = {}
    bad = np.flatnonzero((raw < 0) | (raw > 63))
    for at in bad[np.unique(owner[bad], return_index=True)[1]].tolist():  # the first bad character
        i = int(owner[at])
        problems[i] = f"invalid character {chr(raw[at] + 48)!r} at position {at - begin[i]} of the counts string"
    nonempty = np.flatnonzero(lengths)
    for i in nonempty[(raw[begin[nonempty] + lengths[nonempty] - 1] & 0x20) != 0].tolist():
        problems.setdefault(i, "the counts string ends in the middle of a number")
    if problems:
        keep = np.ones(len(blobs), dtype=bool)
        keep[list(problems)] = False
        raw, owner = raw[keep[owner]], owner[keep[owner]]
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), problems
    ends = np.flatnonzero((raw & 0x20) == 0)  # the last character of each run value
    starts = np.concatenate(([0], ends[:-1] + 1))
    size = ends - starts + 1
    too_long = np.unique(owner[ends[size > _MAX_GROUP]])
    for i in too_long.tolist():
        problems[i] = "a run length in the counts string is absurdly long"
    group = np.repeat(np.arange(ends.size), size)
    shift = 5 * np.minimum(np.arange(raw.size) - starts[group], _MAX_GROUP)
    values = np.add.reduceat((raw & 0x1F) << shift, starts)
    negative = (raw[ends] & 0x10) != 0
    values[negative] |= np.left_shift(np.int64(-1), 5 * np.minimum(size[negative], _MAX_GROUP + 1))
    string = owner[ends]  # string of each value, ascending
    first = np.searchsorted(string, string)  # index of its string's first value
    j = np.arange(ends.size) - first  # position of the value in its string
    runs = values.copy()
    for cls in ((j % 2) == 1, ((j % 2) == 0) & (j >= 2)):
        # runs[j] = the sum of the values of j's parity from position 1 (odd) or 2 (even) up to j
        total = np.cumsum(np.where(cls, values, 0))
        before = np.where(first > 0, total[np.maximum(first - 1, 0)], 0)
        runs[cls] = (total - before)[cls]
    if too_long.size:
        ok = ~np.isin(string, too_long)
        runs, string = runs[ok], string[ok]
    return runs, string, problems


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
    return make_rle(h, w, counts)


def area(rle: RLE) -> int:
    return int(mask_utils.area(to_coco(rle)))


def areas(coco_rles: list[dict]) -> list[int]:
    """Pixel counts of several masks in pycocotools form (`to_coco`) in one call: equal to
    `area` of each, without the per-call overhead."""
    if not coco_rles:
        return []
    return mask_utils.area(coco_rles).tolist()


def bbox(rle: RLE) -> tuple[float, float, float, float]:
    x, y, w, h = mask_utils.toBbox(to_coco(rle)).tolist()
    return (float(x), float(y), float(w), float(h))


def union(rles: list[RLE], height: int, width: int) -> RLE:
    """OR of several masks (an all-zero mask when the list is empty)."""
    if not rles:
        return encode(np.zeros((height, width), dtype=bool))
    merged = mask_utils.merge([to_coco(r) for r in rles], intersect=False)
    return make_rle(height, width, merged["counts"].decode("ascii"))


class LabelRuns:
    """Column-major (COCO order) runs of a label map, computed once, to encode many masks from.

    `encode(groups)` is equal, byte for byte, to `encode(np.isin(labels, values))` per group, but a
    panoptic PNG with 30 segments costs one run-length pass instead of 30 full-frame comparisons.
    """

    def __init__(self, labels: np.ndarray) -> None:
        if labels.ndim != 2 or labels.size == 0:
            raise ValueError(f"label map must be a non-empty 2-D array, got shape {labels.shape}")
        self.height, self.width = labels.shape
        flat = labels.ravel(order="F")
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        self.starts = np.concatenate(([0], change))
        self.lengths = np.diff(np.concatenate((self.starts, [flat.size])))
        self.values = flat[self.starts]
        self._order = np.argsort(self.values, kind="stable")  # each label's runs stay in position order
        self._sorted = self.values[self._order]

    def labels(self) -> set[int]:
        """The distinct label values (cheaper than np.unique on the full frame)."""
        return set(np.unique(self.values).tolist())

    def _runs_of(self, value: int) -> np.ndarray:
        lo = np.searchsorted(self._sorted, value, side="left")
        hi = np.searchsorted(self._sorted, value, side="right")
        return self._order[lo:hi]

    def encode(self, groups: dict[object, list[int]]) -> dict[object, RLE]:
        """RLE of the pixels whose label is in each group (name -> label values)."""
        out: dict[object, RLE] = {}
        for name, wanted in groups.items():
            if len(wanted) == 1:  # runs of one label never touch each other: no merging needed
                idx = self._runs_of(wanted[0])
                out[name] = self._rle(self.starts[idx], self.starts[idx] + self.lengths[idx])
                continue
            idx = np.sort(np.concatenate([self._runs_of(v) for v in wanted])) if wanted else np.zeros(0, int)
            starts, ends = self.starts[idx], self.starts[idx] + self.lengths[idx]
            if starts.size:  # merge runs of two selected labels that touch
                keep = np.concatenate(([True], starts[1:] != ends[:-1]))
                last = np.concatenate((np.flatnonzero(keep)[1:] - 1, [starts.size - 1]))
                starts, ends = starts[keep], ends[last]
            out[name] = self._rle(starts, ends)
        return out

    def _rle(self, starts: np.ndarray, ends: np.ndarray) -> RLE:
        total = self.height * self.width
        counts = np.empty(2 * starts.size, dtype=np.int64)
        counts[0::2] = starts - np.concatenate(([0], ends[:-1]))
        counts[1::2] = ends - starts
        tail = total - (int(ends[-1]) if ends.size else 0)
        if tail:
            counts = np.concatenate((counts, [tail]))
        h, w = self.height, self.width
        if total < 2**32:
            # pycocotools reads uncompressed counts as np.array(counts, dtype=np.uint32): from a
            # uint32 array that is a plain copy, from a Python list one conversion per count (~6x
            # slower). Every count is <= total < 2**32, so both give the same values.
            values: Any = counts.astype(np.uint32)
        else:  # the list, as before (whatever pycocotools makes of counts >= 2**32)
            values = counts.tolist()
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": values}, h, w)
        return make_rle(h, w, compressed["counts"].decode("ascii"))
