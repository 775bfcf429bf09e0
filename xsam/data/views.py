"""Derived views of panoptic-style genseg/ovseg records: semantic masks and instance lists.

COCO panoptic and ADE20K records store each panoptic segment once, with its category and `isthing`
(spec §1.4). Semantic and instance evaluation (spec §5: COCO `panoptic_semseg_val2017` and
`instances_val2017`, ADE20K 150 semantic / 100 instance classes) need other shapes of the same
annotation; deriving them here keeps one stored truth instead of three copies per image.
Pure numpy + `xsam.data.masks`.
"""

from __future__ import annotations

import numpy as np

from xsam.data import masks
from xsam.data.schema import RLE, Record, Segment


def _category(record: Record, seg: Segment) -> int:
    if seg.category_id is None:
        raise ValueError(f"record {record.key}: segment {seg.id} has no category_id, so it has no semantic class")
    return seg.category_id


def semantic_view(record: Record) -> dict[int, RLE]:
    """Category id -> the union of all its segments' masks (crowd included), in id order.

    Crowd regions keep their category, as in semantic maps derived from COCO panoptic; pixels a
    metric must skip are the record's `ignore` mask, which `semantic_map` applies.
    """
    by_category: dict[int, list[RLE]] = {}
    for seg in record.segments:
        by_category.setdefault(_category(record, seg), []).append(seg.rle)
    h, w = record.image.height, record.image.width
    return {cid: masks.union(rles, h, w) for cid, rles in sorted(by_category.items())}


def semantic_map(
    record: Record, category_ids: list[int], ignore_value: int = 255, *, apply_ignore: bool = True
) -> np.ndarray:
    """An (H, W) label map: pixel = position of its category in `category_ids`.

    Pixels no segment covers and pixels of categories missing from `category_ids` get
    `ignore_value`; with `apply_ignore` (default) so do the pixels of `record.ignore`.
    `apply_ignore=False` reproduces COCO's `panoptic_semseg_*` ground truth (Mask2Former's
    `prepare_coco_semantic_annos_from_panoptic_annos.py`): there a crowd segment keeps its category,
    whereas a COCO panoptic record's `ignore` also covers crowd regions. Segments are painted in record order (panoptic segments do not
    overlap; if they did, the later one would win). The dtype is uint8 when every label fits, else
    int32.
    """
    index = {cid: k for k, cid in enumerate(category_ids)}
    if len(index) != len(category_ids):
        raise ValueError("category_ids must not repeat an id")
    if 0 <= ignore_value < len(category_ids):
        raise ValueError(f"ignore_value {ignore_value} collides with a class index (0..{len(category_ids) - 1})")
    fits_uint8 = len(category_ids) <= 256 and 0 <= ignore_value <= 255
    out = np.full((record.image.height, record.image.width), ignore_value, np.uint8 if fits_uint8 else np.int32)
    for seg in record.segments:
        k = index.get(_category(record, seg))
        if k is not None:
            out[masks.decode(seg.rle)] = k
    if apply_ignore and record.ignore is not None:
        out[masks.decode(record.ignore)] = ignore_value
    return out


def instance_view(record: Record, thing_category_ids: set[int] | None = None) -> list[Segment]:
    """Thing segments only (copies), crowd ones kept with `iscrowd` so COCO evaluation ignores them.

    A segment is a thing when `isthing` is True; with `thing_category_ids` (e.g. ADE20K's 100
    instance classes) it must also have one of those ids. A segment with `isthing` None is decided
    by `thing_category_ids` alone, and is an error without it.
    """
    out = []
    for seg in record.segments:
        cid = _category(record, seg)
        if seg.isthing is None and thing_category_ids is None:
            raise ValueError(
                f"record {record.key}: segment {seg.id} has isthing=None; pass thing_category_ids to decide"
            )
        is_thing = seg.isthing is not False and (thing_category_ids is None or cid in thing_category_ids)
        if is_thing:
            out.append(seg.model_copy(deep=True))
    return out
