"""cIoU / gIoU for one-mask-per-expression tasks, and N-acc / T-acc for gRefCOCO (spec §5).

Used for refseg (RefCOCO/+/g), reaseg (ReasonSeg), intseg (COCO-Interactive, grouped by prompt
type) and gRefCOCO. Written from GRES's `ReferEvaluator` (henghuiding/ReLA,
`gres_model/evaluation/refer_evaluation.py`), checked against LISA's ReasonSeg validation
(dvlab-research/LISA, `utils/utils.py::intersectionAndUnionGPU` and `train_ds.py::validate`) and
X-SAM's `xsam/xsam/evaluation/utils/iou.py`.

Definitions (values are reported in percent, as the X-SAM paper reports them):

- Per sample, I = |pred & gt| and U = |pred | gt|, pixels of the optional `ignore` mask removed.
- cIoU = sum(I) / sum(U), over all samples.
- gIoU = mean of the per-sample IoU. IoU is I / U when the ground truth is non-empty (0 when U is 0,
  which only happens when every ground-truth pixel is ignored: GRES's `0 if U == 0`), and for an
  empty ground truth (a gRefCOCO no-target expression) 1 when the prediction is empty, else 0.
  There is no epsilon: GRES and X-SAM divide exactly, LISA adds 1e-5 to U, which moves a
  100-pixel IoU by ~1e-7 relative and is not part of the definition.
- N-acc = no-target expressions predicted empty / all no-target expressions; T-acc = target
  expressions predicted non-empty / all target expressions (GRES's `TP / (TP + FN)` and
  `TN / (TN + FP)`, where GRES's "positive" means "no target"). Reported only with
  `no_target=True`, and each only when its denominator is non-zero: a split without no-target
  expressions has no N-acc (GRES would report 0, and a ratio of nothing is not 100 either).

Emptiness. GRES reads "no target" from a classifier head (`nt_label`); X-SAM has no such head, so a
prediction is empty when its mask has no pixel at all, read on the full mask *before* the ignore
region is removed (as a `pred.sum() == 0` test on the output mask would). A ground truth is empty
(no-target) the same way: no pixel in the full mask. `pred=None` (the model gave no mask) is an
empty mask.

How no-target samples enter cIoU, following GRES exactly: a no-target expression predicted empty
adds I = 0 and U = 0; predicted non-empty adds I = 0 and U = its union (= the predicted pixels); a
target expression predicted empty adds I = 0 and U = |gt|. With emptiness read off the mask these
are exactly the I and U counted on the masks, so every sample adds its own (I, U) and no special
case is needed. When sum(U) is 0 (every sample an empty prediction of an empty ground truth) cIoU is
undefined: GRES divides by zero, so the key is left out of `result()` instead of made up.

Keys. Each sample has a string key that must be unique across the run and across `merge`d
accumulators (spec §7 pitfall 7: X-SAM's `f"{image_id}{sample_id}"` makes (1, 23) and (12, 3)
collide). Build keys with a separator, e.g. `f"{image_id}/{expression_id}"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MaskScore", "ReferringMetrics", "intersection_union"]


def _check_mask(name: str, mask: np.ndarray, where: str) -> np.ndarray:
    """`mask` as a 2-D bool array; 0/1 integer arrays are accepted, anything else is an error."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}{name} must be a 2-D (H, W) mask, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(
                f"{where}{name} is an integer array with values outside 0/1 "
                f"(min {mask.min()}, max {mask.max()}); pass a bool mask, e.g. `labels == value`"
            )
        return mask.astype(bool)
    raise ValueError(
        f"{where}{name} has dtype {mask.dtype}; pass a bool mask (threshold scores first, "
        "e.g. `logits > 0`)"
    )


def _intersection_union(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None, where: str) -> tuple[int, int]:
    pred = _check_mask("pred", pred, where)
    gt = _check_mask("gt", gt, where)
    if pred.shape != gt.shape:
        raise ValueError(
            f"{where}pred has shape {pred.shape} but gt has shape {gt.shape}; "
            "resize the prediction to the ground-truth size before scoring"
        )
    inter = np.logical_and(pred, gt)
    union = np.logical_or(pred, gt)
    if ignore is not None:
        ignore = _check_mask("ignore", ignore, where)
        if ignore.shape != gt.shape:
            raise ValueError(f"{where}ignore has shape {ignore.shape} but gt has shape {gt.shape}")
        keep = ~ignore
        inter &= keep
        union &= keep
    return int(np.count_nonzero(inter)), int(np.count_nonzero(union))


def intersection_union(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """(|pred & gt|, |pred | gt|) of two bool (H, W) masks; pixels where `ignore` is True count in
    neither."""
    return _intersection_union(pred, gt, ignore, "")


@dataclass(kw_only=True, slots=True)
class MaskScore:
    """One scored expression: its counts, its IoU in [0, 1] as GRES scores it, and its outcome."""

    key: str
    intersection: int
    union: int
    iou: float
    gt_empty: bool
    pred_empty: bool
    group: str | None = None


def _sample_iou(intersection: int, union: int, gt_empty: bool, pred_empty: bool) -> float:
    if gt_empty:
        return 1.0 if pred_empty else 0.0
    return 0.0 if union == 0 else intersection / union


def _scores(samples: list[MaskScore]) -> dict[str, float]:
    out: dict[str, float] = {}
    total_union = sum(s.union for s in samples)
    if total_union > 0:
        out["cIoU"] = 100.0 * sum(s.intersection for s in samples) / total_union
    out["gIoU"] = 100.0 * math.fsum(s.iou for s in samples) / len(samples)
    return out


class ReferringMetrics:
    """Accumulates one mask per expression and reports cIoU / gIoU (and N-acc / T-acc)."""

    def __init__(self, *, no_target: bool = False) -> None:
        """
        Args:
            no_target: the split has no-target expressions (gRefCOCO): also report N-acc and T-acc.
                It changes nothing else: an empty ground truth is scored the GRES way either way.
        """
        self.no_target = no_target
        self.samples: list[MaskScore] = []
        self._keys: set[str] = set()

    def add(
        self,
        key: str,
        pred: np.ndarray | None,
        gt: np.ndarray,
        *,
        ignore: np.ndarray | None = None,
        group: str | None = None,
    ) -> MaskScore:
        """Score one expression's predicted mask against its ground truth and keep the score.

        Args:
            key: unique id of the expression (see the module docstring on building keys).
            pred: the predicted bool (H, W) mask; None when the model gave no mask (= empty).
            gt: the ground-truth bool (H, W) mask (the union of the referred objects).
            ignore: optional bool (H, W); pixels counted in neither I nor U.
            group: optional sub-set name (intseg: the prompt type) reported on its own as well.
        """
        if key in self._keys:
            raise ValueError(
                f"sample {key!r} was added twice; keys must be unique per expression "
                "(build them with a separator, e.g. f'{image_id}/{expression_id}')"
            )
        where = f"sample {key!r}: "
        gt = _check_mask("gt", gt, where)
        pred = np.zeros(gt.shape, dtype=bool) if pred is None else _check_mask("pred", pred, where)
        intersection, union = _intersection_union(pred, gt, ignore, where)
        # Emptiness is read on the full masks, before the ignore region is removed (module docstring).
        pred_empty = not pred.any()
        gt_empty = not gt.any()
        score = MaskScore(
            key=key,
            intersection=intersection,
            union=union,
            iou=_sample_iou(intersection, union, gt_empty, pred_empty),
            gt_empty=gt_empty,
            pred_empty=pred_empty,
            group=group,
        )
        self.samples.append(score)
        self._keys.add(key)
        return score

    def merge(self, other: ReferringMetrics) -> None:
        """Append `other`'s samples (another rank's accumulator). Nothing changes on an error."""
        if other.no_target != self.no_target:
            raise ValueError(
                f"cannot merge accumulators with no_target={self.no_target} and no_target={other.no_target}; "
                "build every rank's ReferringMetrics with the same no_target"
            )
        clash = sorted(self._keys.intersection(other._keys))
        if clash:
            raise ValueError(
                f"{len(clash)} sample key(s) are in both accumulators, e.g. {clash[:3]}; each expression "
                "must be scored on one rank only (shard the evaluation set without overlap)"
            )
        self.samples.extend(other.samples)
        self._keys.update(other._keys)

    def result(self) -> dict[str, float]:
        """cIoU, gIoU (+ N-acc, T-acc with no_target) and per-group cIoU / gIoU, in percent."""
        if not self.samples:
            raise ValueError("no samples were scored; call add() for each expression before result()")
        out = _scores(self.samples)
        if self.no_target:
            no_target = [s for s in self.samples if s.gt_empty]
            target = [s for s in self.samples if not s.gt_empty]
            if no_target:
                out["N-acc"] = 100.0 * sum(s.pred_empty for s in no_target) / len(no_target)
            if target:
                out["T-acc"] = 100.0 * sum(not s.pred_empty for s in target) / len(target)
        groups = sorted({s.group for s in self.samples if s.group is not None})
        for group in groups:
            for name, value in _scores([s for s in self.samples if s.group == group]).items():
                out[f"{group}/{name}"] = value
        return out
