"""Panoptic Quality (PQ, SQ, RQ) for genseg and ovseg, exactly as panopticapi computes it (spec §5).

Kirillov et al., "Panoptic Segmentation", CVPR 2019. Written from cocodataset/panopticapi
`panopticapi/evaluation.py` at 7bb4655548f98f3fedc07bf37e9040a992b054b0 (`pq_compute_single_core`,
`PQStat.pq_average`) and `panopticapi/utils.py` (`rgb2id`, `id2rgb`); X-SAM's own
`evaluation/utils/pq.py` scores in panopticapi's format. The rules, per image:

- Segment id 0 in the ground truth is VOID (unlabeled). Areas are pixel counts of the id maps.
- A ground-truth segment and a predicted segment of the same category match when IoU > 0.5, where
  union = pred area + gt area - intersection - (pred ∩ VOID): predicted pixels on VOID never cost IoU.
  IoU > 0.5 makes every match one-to-one, so no assignment problem is solved.
- Crowd ground truth (iscrowd) never matches and is never a false negative; every other unmatched
  ground-truth segment is a false negative (FN) of its category.
- An unmatched predicted segment is a false positive (FP) of its category unless more than half of its
  area lies on VOID plus the crowd region of its own category. When an image has several crowd segments
  of one category, panopticapi keeps only the last one listed (a dict keyed by category), and so does
  this module.
- Per category, over all images: PQ = sum(IoU of TPs) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP
  (0 without TP), RQ = TP / (TP + FP/2 + FN/2). A category counts when TP + FP + FN > 0; All, Things
  and Stuff are plain means over the counted categories of the group.

Deliberate differences, none of which changes a number panopticapi reports on well-formed input:
- Ground-truth areas are pixel counts of `gt_ids`; panopticapi reads them from the JSON's "area", which
  is that same count in COCO panoptic (all 32 segments of val2017 image 439180 agree).
- A group with no counted category (e.g. Stuff on a thing-only dataset) reports 0.0 and n = 0;
  panopticapi divides 0 by 0 there and raises ZeroDivisionError.
- The IoUs of a category are summed with `math.fsum` (the correctly rounded sum), so the result does not
  depend on the order of `add` and `merge`; panopticapi's plain running sum depends on how its worker
  processes split the images, which moves the result in the last bits only.
- panopticapi's errors (KeyError there) are ValueErrors here, naming the image and the segment id. The
  ground truth is checked too: panopticapi silently skips a ground-truth id that is in the map but not in
  the segment list and drops categories it does not know, which here are errors; duplicate segment ids
  and segment id 0 in a segment list are errors as well.
- The predicted segments' `iscrowd` is ignored, as panopticapi ignores it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PanopticMetrics", "PanopticSegment", "id_to_rgb", "rgb_to_id"]

VOID = 0
_MAX_ID = 256**3  # three 8-bit PNG channels
# A (gt id, pred id) pair is one uint64, gt id in the high 32 bits: ids up to 2^32 - 1 fit, PNG ids use 24.
_SHIFT = np.uint64(32)
_LOW = np.uint64(2**32 - 1)


@dataclass(kw_only=True, slots=True)
class PanopticSegment:
    """One entry of a panoptic `segments_info`: the segment's id in the id map, its category, crowd flag."""

    id: int
    category_id: int
    iscrowd: bool = False


@dataclass(kw_only=True, slots=True)
class _Category:
    id: int
    name: str
    isthing: bool


@dataclass(kw_only=True, slots=True)
class _CategoryStat:
    ious: list[float] = field(default_factory=list)  # one per true positive, so TP = len(ious)
    fp: int = 0
    fn: int = 0


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG: R + 256 G + 256^2 B (panopticapi's `rgb2id`), as int64 (H x W)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_id needs an H x W x 3 array (an RGB panoptic PNG), got shape {rgb.shape}")
    if not np.issubdtype(rgb.dtype, np.integer):
        raise ValueError(f"rgb_to_id needs an integer array (uint8 from the PNG), got {rgb.dtype}")
    if rgb.dtype != np.uint8 and rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        raise ValueError("rgb_to_id: channel values must lie in 0..255")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_id` (panopticapi's `id2rgb`): an ... x 3 uint8 array to write as a PNG."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"id_to_rgb needs integer segment ids, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= _MAX_ID):
        # panopticapi would wrap such an id silently; the PNG would then hold another segment's id.
        raise ValueError(f"id_to_rgb: segment ids must lie in 0..{_MAX_ID - 1} to fit three 8-bit channels")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


class PanopticMetrics:
    """Accumulates panopticapi's per-category TP / FP / FN / IoU over images and reports PQ, SQ, RQ."""

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        """
        Args:
            categories: the dataset's categories, each {"id", "name", "isthing"} (isthing a bool or 0/1),
                e.g. the "categories" of panoptic_val2017.json. Every segment's category must be one of
                them; their order is the order of `per_class()` (and of panopticapi's sums).
        """
        self._categories: dict[int, _Category] = {}
        names: set[str] = set()
        for i, cat in enumerate(categories):
            missing = [k for k in ("id", "name", "isthing") if k not in cat]
            if missing:
                raise ValueError(f"category #{i} ({dict(cat)!r}) lacks {', '.join(missing)}")
            cat_id, name, isthing = cat["id"], str(cat["name"]), cat["isthing"]
            if isinstance(cat_id, bool) or not isinstance(cat_id, (int, np.integer)):
                raise ValueError(f"category {name!r}: id must be an integer, got {cat_id!r}")
            if isthing not in (0, 1):  # True / False compare equal to 1 / 0
                raise ValueError(f"category {name!r}: isthing must be a bool or 0/1, got {isthing!r}")
            if int(cat_id) in self._categories:
                first = self._categories[int(cat_id)].name
                raise ValueError(f"category id {cat_id} is listed twice ({first!r}, {name!r})")
            if name in names:
                raise ValueError(f"category name {name!r} is listed twice; per_class() is keyed by name")
            names.add(name)
            self._categories[int(cat_id)] = _Category(id=int(cat_id), name=name, isthing=bool(isthing))
        if not self._categories:
            raise ValueError("PanopticMetrics needs at least one category")
        self._stats: dict[int, _CategoryStat] = {cat_id: _CategoryStat() for cat_id in self._categories}
        self._images: set[str] = set()

    @property
    def num_images(self) -> int:
        """How many images were added (merged ones included)."""
        return len(self._images)

    def add(
        self,
        image: str,
        gt_ids: np.ndarray,
        gt_segments: Sequence[PanopticSegment],
        pred_ids: np.ndarray,
        pred_segments: Sequence[PanopticSegment],
    ) -> None:
        """Score one image: `gt_ids` / `pred_ids` are H x W integer segment-id maps (0 = VOID / unlabeled),
        the segment lists say each id's category. `image` names the image in errors and may be added once.
        Nothing is accumulated when an error is raised."""
        if image in self._images:
            raise ValueError(f"image {image!r} was already added; each image is scored once")
        gt_ids = self._check_map(image, "gt_ids", gt_ids)
        pred_ids = self._check_map(image, "pred_ids", pred_ids)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(
                f"image {image!r}: gt_ids has shape {gt_ids.shape} but pred_ids {pred_ids.shape}; "
                "resize the prediction to the ground truth's size first"
            )
        gt_segms = self._index_segments(image, "gt_segments", gt_segments)
        pred_segms = self._index_segments(image, "pred_segments", pred_segments)

        # One pass over the pixels: the pixel count of every (gt id, pred id) pair present, in ascending
        # (gt id, pred id) order as panopticapi's np.unique(gt * OFFSET + pred) gives them; both areas are
        # sums of these counts.
        pair_ids = (gt_ids.astype(np.uint64) << _SHIFT) | pred_ids.astype(np.uint64)
        pairs, counts = np.unique(pair_ids, return_counts=True)
        intersection: dict[tuple[int, int], int] = {}
        gt_area: dict[int, int] = defaultdict(int)
        pred_area: dict[int, int] = defaultdict(int)
        for gt_label, pred_label, count in zip((pairs >> _SHIFT).tolist(), (pairs & _LOW).tolist(), counts.tolist()):
            intersection[(gt_label, pred_label)] = count
            gt_area[gt_label] += count
            pred_area[pred_label] += count

        for label in pred_area:
            if label != VOID and label not in pred_segms:
                raise ValueError(
                    f"image {image!r}: segment id {label} is in pred_ids but not in pred_segments; "
                    "list it or set its pixels to 0"
                )
        absent = [seg_id for seg_id in pred_segms if seg_id not in pred_area]
        if absent:
            raise ValueError(
                f"image {image!r}: pred_segments ids {absent} have no pixel in pred_ids; drop them from the list"
            )
        for label in gt_area:
            if label != VOID and label not in gt_segms:
                raise ValueError(f"image {image!r}: segment id {label} is in gt_ids but not in gt_segments")

        stats: dict[int, _CategoryStat] = {}
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (gt_label, pred_label), inter in intersection.items():
            if gt_label == VOID or pred_label == VOID:
                continue
            gt_seg, pred_seg = gt_segms[gt_label], pred_segms[pred_label]
            if gt_seg.iscrowd or gt_seg.category_id != pred_seg.category_id:
                continue
            union = pred_area[pred_label] + gt_area[gt_label] - inter - intersection.get((VOID, pred_label), 0)
            iou = inter / union
            if iou > 0.5:
                stats.setdefault(gt_seg.category_id, _CategoryStat()).ious.append(iou)
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)

        crowd_of_category: dict[int, int] = {}
        for gt_label, gt_seg in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_seg.iscrowd:
                crowd_of_category[gt_seg.category_id] = gt_label  # the last crowd segment listed wins
                continue
            stats.setdefault(gt_seg.category_id, _CategoryStat()).fn += 1

        for pred_label, pred_seg in pred_segms.items():
            if pred_label in pred_matched:
                continue
            ignored = intersection.get((VOID, pred_label), 0)
            crowd = crowd_of_category.get(pred_seg.category_id)
            if crowd is not None:
                ignored += intersection.get((crowd, pred_label), 0)
            if ignored / pred_area[pred_label] > 0.5:
                continue
            stats.setdefault(pred_seg.category_id, _CategoryStat()).fp += 1

        for cat_id, stat in stats.items():
            self._stats[cat_id].ious.extend(stat.ious)
            self._stats[cat_id].fp += stat.fp
            self._stats[cat_id].fn += stat.fn
        self._images.add(image)

    def merge(self, other: PanopticMetrics) -> None:
        """Add another accumulator's images (e.g. another worker's shard); their image sets must be disjoint."""
        if not isinstance(other, PanopticMetrics):
            raise TypeError(f"can only merge a PanopticMetrics, got {type(other).__name__}")
        if other._categories != self._categories:
            raise ValueError("cannot merge PanopticMetrics built with different categories")
        both = self._images & other._images
        if both:
            raise ValueError(f"cannot merge: images {sorted(both)[:5]} were scored in both accumulators")
        for cat_id, stat in other._stats.items():
            self._stats[cat_id].ious.extend(stat.ious)
            self._stats[cat_id].fp += stat.fp
            self._stats[cat_id].fn += stat.fn
        self._images |= other._images

    def result(self) -> dict[str, float]:
        """PQ / SQ / RQ in percent for All, Things (`_th`) and Stuff (`_st`), and the number of categories
        each mean is over (`n`, `n_th`, `n_st`). A group without a counted category reports 0.0."""
        out: dict[str, float] = {}
        for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
            pq = sq = rq = 0.0
            n = 0
            for cat_id, (cat_pq, cat_sq, cat_rq) in self._per_category().items():
                if isthing is not None and self._categories[cat_id].isthing != isthing:
                    continue
                n += 1
                pq += cat_pq
                sq += cat_sq
                rq += cat_rq
            for key, total in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                out[key + suffix] = 100 * (total / n) if n else 0.0
            out["n" + suffix] = n
        return out

    def per_class(self) -> dict[str, dict[str, float]]:
        """Category name -> {"PQ", "SQ", "RQ"} in percent and {"tp", "fp", "fn"} counts, for the counted
        categories (TP + FP + FN > 0), in the order the categories were given."""
        out: dict[str, dict[str, float]] = {}
        for cat_id, (pq, sq, rq) in self._per_category().items():
            stat = self._stats[cat_id]
            out[self._categories[cat_id].name] = {
                "PQ": 100 * pq,
                "SQ": 100 * sq,
                "RQ": 100 * rq,
                "tp": len(stat.ious),
                "fp": stat.fp,
                "fn": stat.fn,
            }
        return out

    def _per_category(self) -> dict[int, tuple[float, float, float]]:
        """(PQ, SQ, RQ) as fractions for each counted category, in category order (`PQStat.pq_average`)."""
        out: dict[int, tuple[float, float, float]] = {}
        for cat_id in self._categories:
            stat = self._stats[cat_id]
            tp, fp, fn = len(stat.ious), stat.fp, stat.fn
            if tp + fp + fn == 0:
                continue
            iou = math.fsum(stat.ious)
            denominator = tp + 0.5 * fp + 0.5 * fn
            out[cat_id] = (iou / denominator, iou / tp if tp != 0 else 0.0, tp / denominator)
        return out

    @staticmethod
    def _check_map(image: str, what: str, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(
                f"image {image!r}: {what} must be an H x W segment-id map, got shape {ids.shape} "
                "(convert an RGB panoptic PNG with rgb_to_id)"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"image {image!r}: {what} must hold integer segment ids, got {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"image {image!r}: {what} is empty (shape {ids.shape})")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= 2**32:
            raise ValueError(
                f"image {image!r}: {what} holds segment id {low if low < 0 else high}; "
                "ids must lie in 0..2^32 - 1 (panoptic PNG ids are < 2^24)"
            )
        return ids

    def _index_segments(
        self, image: str, what: str, segments: Sequence[PanopticSegment]
    ) -> dict[int, PanopticSegment]:
        """Segments by id, in list order (the order panopticapi's crowd rule depends on)."""
        by_id: dict[int, PanopticSegment] = {}
        for seg in segments:
            seg_id = int(seg.id)
            if seg_id == VOID:
                raise ValueError(f"image {image!r}: {what} lists segment id 0, which is reserved for VOID")
            if seg_id in by_id:
                raise ValueError(f"image {image!r}: {what} lists segment id {seg_id} twice")
            if seg.category_id not in self._categories:
                raise ValueError(
                    f"image {image!r}: segment id {seg_id} in {what} has unknown category_id {seg.category_id}"
                )
            by_id[seg_id] = seg
        return by_id
