"""mIoU, fwIoU, mACC and pACC from a confusion matrix, for genseg-semantic and ovseg-semantic (spec §5).

Written from detectron2's `SemSegEvaluator` (facebookresearch/detectron2,
`detectron2/evaluation/sem_seg_evaluation.py`; boundary IoU and the JSON dump are left out):

- The matrix is (num_classes + 1) x (num_classes + 1), int64, indexed `[pred, gt]` (detectron2's
  `bincount((num_classes + 1) * pred + gt)`); index `num_classes` is the extra row / column.
- Ground-truth pixels equal to `ignore_value` go to the extra column, which no metric reads.
- detectron2 predicts by argmax, so its extra row stays empty. Here a prediction may be
  `ignore_value`, "no class predicted here" (a mask-classification model can leave pixels
  uncovered); it goes to the extra row. Such a pixel is a miss for its ground-truth class: it counts
  in that class's ground-truth total (and in pACC's denominator) but in no class's predictions.
  detectron2 sums ground truth over `matrix[:-1, :-1]`, which would drop these pixels silently, so
  the ground-truth totals here sum over all rows, `matrix[:, :-1]`; with an empty extra row (any
  argmax prediction) this is exactly detectron2's number.
- Per class c: TP = matrix[c, c], GT = column c over all rows, PRED = row c without the ignored
  column, IoU = TP / (GT + PRED - TP), ACC = TP / GT.
- Which classes count (detectron2's `acc_valid` / `iou_valid`): exactly the classes with at least
  one ground-truth pixel. A class with predictions but no ground truth is left out of every mean
  (its false positives still lower the IoU of the classes whose pixels they took).
- mIoU and mACC: plain means over those classes; fwIoU: IoU weighted by GT / sum(GT);
  pACC: sum(TP) / sum(GT). All in percent.

X-SAM's own `xsam/xsam/evaluation/utils/miou.py` differs (a num_classes^2 matrix over raw category
ids, every class in the mean with an epsilon); the spec asks for detectron2's definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SemanticMetrics"]


class SemanticMetrics:
    """Accumulates a confusion matrix over integer label maps and reports semantic metrics."""

    def __init__(self, num_classes: int, *, class_names: Sequence[str] | None = None, ignore_value: int = 255) -> None:
        """
        Args:
            num_classes: number of classes; labels are 0 .. num_classes - 1.
            class_names: one name per class, used as `per_class_iou()` keys (default: "0", "1", ...).
            ignore_value: in the ground truth, a pixel not to score (COCO void, crowd); in a
                prediction, "no class predicted here". Must lie outside 0 .. num_classes - 1
                (more than 255 classes need another value, e.g. 65535).
        """
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        num_classes = int(num_classes)
        if 0 <= ignore_value < num_classes:
            raise ValueError(
                f"ignore_value={ignore_value} is a class label (0..{num_classes - 1}); "
                "choose a value outside the class range, e.g. 65535"
            )
        if class_names is None:
            names = [str(i) for i in range(num_classes)]
        else:
            names = [str(n) for n in class_names]
            if len(names) != num_classes:
                raise ValueError(f"class_names has {len(names)} names but num_classes is {num_classes}")
            if len(set(names)) != len(names):
                dupes = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"class_names repeats {dupes}; names key per_class_iou() and must be unique")
        self.num_classes = num_classes
        self.class_names = names
        self.ignore_value = int(ignore_value)
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def _labels(self, name: str, labels: np.ndarray, where: str) -> np.ndarray:
        """`labels` as int64 with `ignore_value` moved to `num_classes`; other out-of-range values
        are an error."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"{where}{name} must be a 2-D (H, W) label map, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{where}{name} has dtype {labels.dtype}; pass integer class indices "
                "(argmax the scores, or .astype(np.int64) a float map that holds integers)"
            )
        out = labels.astype(np.int64)
        ignored = out == self.ignore_value
        bad = ~ignored & ((out < 0) | (out >= self.num_classes))
        if bad.any():
            values = np.unique(out[bad])
            raise ValueError(
                f"{where}{name} has label {int(values[0])} ({values.size} distinct bad value(s): "
                f"{values[:5].tolist()}); allowed: 0..{self.num_classes - 1} or ignore_value={self.ignore_value}"
            )
        out[ignored] = self.num_classes
        return out

    def add(self, pred: np.ndarray, gt: np.ndarray, *, key: str | None = None) -> None:
        """Count one image: `pred` and `gt` are integer (H, W) label maps of the same shape.

        Args:
            pred: predicted class per pixel, or `ignore_value` for "no class".
            gt: ground-truth class per pixel, or `ignore_value` for "not scored".
            key: optional image id, only used to name the image in error messages.
        """
        where = "" if key is None else f"sample {key!r}: "
        p = self._labels("pred", pred, where)
        g = self._labels("gt", gt, where)
        if p.shape != g.shape:
            raise ValueError(
                f"{where}pred has shape {p.shape} but gt has shape {g.shape}; "
                "resize the prediction to the ground-truth size (nearest) before scoring"
            )
        n = self.num_classes + 1
        self.confusion += np.bincount((n * p + g).ravel(), minlength=n * n).reshape(n, n)

    def merge(self, other: SemanticMetrics) -> None:
        """Add `other`'s counts (another rank's accumulator over other images)."""
        if (other.num_classes, other.ignore_value) != (self.num_classes, self.ignore_value):
            raise ValueError(
                f"cannot merge SemanticMetrics(num_classes={other.num_classes}, ignore_value={other.ignore_value}) "
                f"into (num_classes={self.num_classes}, ignore_value={self.ignore_value}); "
                "build every rank's accumulator with the same arguments"
            )
        if other.class_names != self.class_names:
            raise ValueError("cannot merge accumulators with different class_names")
        self.confusion += other.confusion

    def _per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tp, gt totals, iou, valid) per class, as float arrays; iou is NaN where not valid."""
        c = self.num_classes
        tp = self.confusion.diagonal()[:c].astype(np.float64)
        pos_gt = self.confusion[:, :c].sum(axis=0).astype(np.float64)  # every row: "no class" is a miss
        pos_pred = self.confusion[:c, :c].sum(axis=1).astype(np.float64)  # ignored GT column left out
        valid = pos_gt > 0
        iou = np.full(c, np.nan)
        iou[valid] = tp[valid] / (pos_gt + pos_pred - tp)[valid]
        return tp, pos_gt, iou, valid

    def result(self) -> dict[str, float]:
        """mIoU, fwIoU, mACC and pACC in percent, over the classes with ground-truth pixels."""
        tp, pos_gt, iou, valid = self._per_class()
        if not valid.any():
            raise ValueError(
                "no ground-truth pixels were scored (none added, or every one equal to ignore_value); "
                "call add() with ground truth holding class labels before result()"
            )
        acc = tp[valid] / pos_gt[valid]
        weights = pos_gt / pos_gt.sum()
        return {
            "mIoU": 100.0 * float(iou[valid].mean()),
            "fwIoU": 100.0 * float((iou[valid] * weights[valid]).sum()),
            "mACC": 100.0 * float(acc.mean()),
            "pACC": 100.0 * float(tp.sum() / pos_gt.sum()),
        }

    def per_class_iou(self) -> dict[str, float]:
        """Class name -> IoU in percent, for the classes with ground-truth pixels only."""
        _, _, iou, valid = self._per_class()
        return {self.class_names[i]: 100.0 * float(iou[i]) for i in np.flatnonzero(valid)}
