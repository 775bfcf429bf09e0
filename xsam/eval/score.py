"""Score a prediction file against the ground truth held in a dataset folder (`xsam eval score`).

`score(task, dataset, predictions)` reads the task's ground truth (`xsam.eval.groundtruth`), the
prediction file in the format the reference evaluator reads (`xsam.eval.predictions`), and runs the
task's metrics. The evaluation job writes its own predictions in the same formats and scores them
through this function, so a user scoring the official X-SAM's outputs and our job compute the same
numbers with the same code.

Missing and extra predictions. A ground-truth sample without a prediction is scored as an empty
prediction (a miss, as a crashed sample would be) and listed in `ScoreReport.missing`, never
skipped: skipping would raise the score. A prediction naming no ground-truth sample is an error
(usually the wrong `--split` or the wrong dataset), as is a mask whose size is not its image's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xsam.eval.groundtruth import (
    REFERRING_TASKS, GroundTruth, View, load_ground_truth, record_image_key,
)
from xsam.eval.predictions import (
    PredictionError, coco_results, decode_rle, gcg_results, mask_results, panoptic_results,
)


@dataclass(kw_only=True, slots=True)
class ScoreReport:
    """The scores of one (task, dataset split, prediction set)."""

    task: str
    dataset: str
    split: str
    version: str  # the dataset's version id
    scores: dict[str, float]
    samples: int  # ground-truth samples scored (images, or items for referring tasks)
    missing: list[str] = field(default_factory=list)  # samples without a prediction (scored empty)
    per_class: dict[str, float] = field(default_factory=dict)  # class name -> PQ / IoU / AP
    per_sample: dict[str, float] = field(default_factory=dict)  # sample -> IoU (referring) / PQ (panoptic), 0..1

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "dataset": self.dataset, "split": self.split, "dataset_version": self.version,
            "samples": self.samples, "missing": len(self.missing), "missing_samples": self.missing[:100],
            "scores": {k: _finite(v) for k, v in self.scores.items()},
        }


def _finite(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _check_extra(names: set[str], known: set[str], path: Path, what: str) -> None:
    extra = sorted(names - known)
    if extra:
        raise PredictionError(
            f"{path}: {len(extra)} prediction(s) name no {what} of the ground truth, e.g. {', '.join(extra[:5])}"
            " (wrong --split or wrong dataset?)")


def _mask(rle: dict[str, Any] | None, shape: tuple[int, int], where: str) -> np.ndarray:
    if rle is None:
        return np.zeros(shape, dtype=bool)
    mask = decode_rle(rle, where)
    if mask.shape != shape:
        raise PredictionError(f"{where}: mask size {list(mask.shape)} != image size [h, w] {list(shape)}")
    return mask


def score(
    task: str,
    dataset: str | Path,
    predictions: str | Path,
    *,
    split: str | None = None,
    view: View | None = None,
    text_model: str | Path | None = None,
    ground_truth: GroundTruth | None = None,
) -> ScoreReport:
    """Score the prediction file for `task` against `split` of the dataset folder (see the module
    docstring). `ground_truth` reuses an already loaded one; `text_model` is GCG's phrase-similarity
    BERT folder (recall is reported only with it)."""
    gt = ground_truth or load_ground_truth(task, dataset, split=split, view=view)
    path = Path(predictions)
    if task.endswith("-panoptic"):
        return _panoptic(gt, path)
    if task.endswith("-semantic"):
        return _semantic(gt, path)
    if task.endswith("-instance") or task == "vgdseg":
        return _instance(gt, path)
    if task in REFERRING_TASKS:
        return _referring(gt, path)
    if task == "gcgseg":
        return _gcg(gt, path, text_model)
    raise ValueError(f"unknown task {task!r}")


def _report(gt: GroundTruth, scores: dict[str, float], samples: int, missing: list[str], **extra: Any) -> ScoreReport:
    return ScoreReport(task=gt.task, dataset=gt.dataset, split=gt.split, version=gt.version, scores=scores,
                       samples=samples, missing=missing, **extra)


def _panoptic(gt: GroundTruth, path: Path) -> ScoreReport:
    from xsam.eval.panoptic import PanopticMetrics, PanopticSegment

    preds = panoptic_results(path)
    images = gt.images
    _check_extra(set(preds), set(images), path, "image")
    metrics = PanopticMetrics(gt.categories)
    missing, per_sample = [], {}
    for key, record in images.items():
        gt_ids, gt_segments = gt.panoptic(record)
        pred = preds.get(key)
        if pred is None:
            missing.append(key)
            pred_ids, pred_segments = np.zeros_like(gt_ids), []
        else:
            pred_ids = pred.ids()
            if pred_ids.shape != gt_ids.shape:
                raise PredictionError(f"{pred.png}: PNG size {list(pred_ids.shape)} != image {key} size {list(gt_ids.shape)}")
            pred_segments = [PanopticSegment(id=i, category_id=c) for i, c in pred.segments]
        truth = [PanopticSegment(id=i, category_id=c, iscrowd=crowd) for i, c, crowd in gt_segments]
        one = PanopticMetrics(gt.categories)  # the image's own PQ (its best and worst images), then the total
        one.add(key, gt_ids, truth, pred_ids, pred_segments)
        per_sample[key] = one.result()["PQ"] / 100
        metrics.merge(one)
    per_class = {name: v["PQ"] for name, v in metrics.per_class().items()}
    return _report(gt, metrics.result(), len(images), missing, per_class=per_class, per_sample=per_sample)


def _semantic(gt: GroundTruth, path: Path) -> ScoreReport:
    from xsam.eval.semantic import SemanticMetrics

    results = coco_results(path)
    images = gt.images
    _check_extra({r.image for r in results}, set(images), path, "image")
    index = {c["id"]: k for k, c in enumerate(gt.categories)}
    metrics = SemanticMetrics(len(gt.categories), class_names=[c["name"] for c in gt.categories], ignore_value=255)
    by_image: dict[str, list[Any]] = {}
    for r in results:
        if r.category_id not in index:
            raise PredictionError(f"{path}: entry {r.index}: category_id {r.category_id} is not in the dataset's categories")
        by_image.setdefault(r.image, []).append(r)
    missing = []
    for key, record in images.items():
        target = gt.semantic(record)
        pred = np.full(target.shape, 255, dtype=np.int32)
        entries = by_image.get(key)
        if not entries:
            missing.append(key)
        for r in sorted(entries or [], key=lambda r: r.score):  # the higher score wins an overlap
            pred[_mask(r.segmentation, target.shape, f"{path}: entry {r.index}")] = index[r.category_id]
        metrics.add(pred, target.astype(np.int32))
    return _report(gt, metrics.result(), len(images), missing, per_class=metrics.per_class_iou())


def _instance(gt: GroundTruth, path: Path) -> ScoreReport:
    from xsam.eval.coco import mask_ap

    results = coco_results(path)
    ids = gt.coco_image_ids()
    _check_extra({r.image for r in results}, set(ids), path, "image")
    categories = gt.categories if gt.task == "vgdseg" else gt.instance_categories()
    known = {c["id"] for c in categories}
    for r in results:
        if r.category_id not in known:
            raise PredictionError(f"{path}: entry {r.index}: category_id {r.category_id} is not one of the"
                                  f" {len(known)} categories {gt.task} scores (thing classes for instance AP)")
    seen = {r.image for r in results}
    missing = [k for k in ids if k not in seen]
    converted = [{"image_id": ids[r.image], "category_id": r.category_id, "segmentation": r.segmentation,
                  "score": r.score} for r in results]
    found = mask_ap(gt.coco_images(), gt.coco_annotations(), categories, converted)
    return _report(gt, found.stats, len(ids), missing, per_class=found.per_class)


def _referring(gt: GroundTruth, path: Path) -> ScoreReport:
    from xsam.eval.referring import ReferringMetrics

    preds = mask_results(path)
    samples = list(gt.referring_samples())
    known = {s.key for s in samples} | {a for s in samples for a in s.aliases}
    _check_extra(set(preds), known, path, "evaluation item")
    metrics = ReferringMetrics(no_target=gt.task == "grefseg")
    missing = []
    for s in samples:
        name = s.key if s.key in preds else next((a for a in s.aliases if a in preds), None)
        if name is None:
            missing.append(s.key)
        shape = (s.record.image.height, s.record.image.width)
        pred = _mask(preds.get(name) if name else None, shape, f"{path}: prediction for {name or s.key}")
        metrics.add(s.key, pred, s.gt_mask(), ignore=s.ignore(), group=s.group)
    per_sample = {m.key: m.iou for m in metrics.samples}
    scores = metrics.result()
    if gt.task == "intseg":  # X-SAM's interactive "mIoU" is the per-sample mean IoU, i.e. gIoU (spec §5)
        scores = {**scores, "mIoU": scores["gIoU"],
                  **{f"{k[:-len('/gIoU')]}/mIoU": v for k, v in scores.items() if k.endswith("/gIoU")}}
    return _report(gt, scores, len(samples), missing, per_sample=per_sample)


def _gcg(gt: GroundTruth, path: Path, text_model: str | Path | None) -> ScoreReport:
    from xsam.eval.gcg import GcgSample, gcg_scores

    preds = gcg_results(path)
    rows = list(gt.gcg_samples())
    known = {record_image_key(r) for r, _, _ in rows} | {r.key for r, _, _ in rows}
    _check_extra(set(preds), known, path, "image")
    samples, missing = [], []
    for record, phrases, masks in rows:
        pred = preds.get(record_image_key(record)) or preds.get(record.key)
        shape = (record.image.height, record.image.width)
        if pred is None:
            missing.append(record.key)
            caption, pred_phrases, pred_masks, scores = "", [], [], None
        else:
            where = f"{path}: image {record_image_key(record)}"
            caption, pred_phrases, scores = pred.caption, pred.phrases, pred.scores
            pred_masks = [_mask(m, shape, f"{where} phrase {j}") for j, m in enumerate(pred.segmentations)]
        samples.append(GcgSample(key=record.key, gt_caption=record.captions[0], gt_phrases=phrases, gt_masks=masks,
                                 pred_caption=caption, pred_phrases=pred_phrases, pred_masks=pred_masks,
                                 pred_scores=scores))
    return _report(gt, gcg_scores(samples, text_model=text_model), len(samples), missing)
