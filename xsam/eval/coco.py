"""Mask AP with pycocotools' COCOeval (iouType "segm"): genseg / ovseg instance AP, vgdseg AP and
GCG's AP50 (spec §5).

The ground truth is built in memory (no temporary files), the results go through `COCO.loadRes` and
`COCOeval(iouType="segm")` runs evaluate / accumulate / summarize with its printing captured. The
summary and the per-category AP follow detectron2's `COCOEvaluator._derive_coco_results`
(facebookresearch/detectron2 `detectron2/evaluation/coco_evaluation.py`), which X-SAM copies into
`xsam/xsam/evaluation/utils/map.py` (wanghao9610/X-SAM@2e76946bcd690d40ac473a50753ac23e1a138330):
the standard numbers are `COCOeval.stats[0:6]` and a category's AP is the mean of
`eval["precision"][:, :, k, area=all, maxDets=100]` over its entries > -1. As detectron2 does before
a "segm" evaluation, a result's `bbox` is not passed on, so that COCOeval sizes a result by its mask
area and not by its box.

All values are percentages (0-100).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(kw_only=True, slots=True)
class MaskAP:
    """COCO mask AP of one evaluation, in percent.

    stats: "AP" (IoU .50:.95), "AP50", "AP75", "APs", "APm", "APl" (area all / small / medium /
        large, maxDets 100) = `COCOeval.stats[0:6]` x 100. COCOeval reports -1 for a number it
        cannot compute (no ground truth of that size, or none at all); such a number is left out of
        the dict rather than reported as -1 or NaN, so `"APs" not in stats` means "no small
        ground truth".
    per_class: category name -> AP (IoU .50:.95, area all, maxDets 100). Categories without ground
        truth are left out. Empty in class-agnostic mode (`use_categories=False`).
    precision: `COCOeval.eval["precision"]`, shape [T, R, K, A, M] (IoU thresholds, recall
        thresholds, categories in ascending id order, area ranges, maxDets), -1 where undefined;
        kept for precision-recall plots. Values are fractions (0-1), as COCOeval has them.
    recall_thresholds: the R recall thresholds of `precision` (`COCOeval.params.recThrs`).
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    precision: np.ndarray
    recall_thresholds: np.ndarray


def mask_ap(
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    *,
    use_categories: bool = True,
) -> MaskAP:
    """COCO mask AP of `results` against the ground truth `images` / `annotations` / `categories`.

    images: `{"id": int, "width": int, "height": int}` per image; every image counts, with or
        without results (an image without results only adds misses).
    annotations: COCO ground truth `{"id", "image_id", "category_id", "segmentation", "area",
        "iscrowd"}` (a `bbox` is accepted and not read: "segm" evaluation does not use it). The
        segmentation is a compressed RLE `{"size": [h, w], "counts": str}`; an uncompressed RLE
        (counts a list) or polygons are converted with `pycocotools.mask.frPyObjects`. `area`
        decides small / medium / large as in COCO; crowd regions (`iscrowd` 1) are ignored as
        COCOeval does. Ids must be unique and non-zero (COCOeval takes a match to id 0 for no match).
    categories: `{"id": int, "name": str}`.
    results: `{"image_id", "category_id", "segmentation": RLE, "score"}`; not modified.
    use_categories: False evaluates class-agnostically (`params.useCats = 0`): a result may match
        ground truth of any category; `per_class` is then empty.

    Empty `results` give AP 0 for every number that has ground truth (pycocotools' `loadRes`
    cannot take an empty list, so the empty result set is built directly).
    """
    if not images:
        raise ValueError("mask_ap: no images were given; pass the images the ground truth covers")
    image_sizes = _image_sizes(images)
    category_names = _category_names(categories)

    gt_annotations = []
    seen_ids: set[Any] = set()
    for n, ann in enumerate(annotations):
        where = f"ground-truth annotation #{n} (id {ann.get('id')!r}, image {ann.get('image_id')!r})"
        _require_keys(ann, ("id", "image_id", "category_id", "segmentation", "area", "iscrowd"), where)
        ann_id = ann["id"]
        if ann_id == 0 or ann_id in seen_ids:
            raise ValueError(
                f"mask_ap: {where}: annotation ids must be unique and non-zero (COCOeval reads id 0 as "
                "'unmatched'); renumber the annotations from 1"
            )
        seen_ids.add(ann_id)
        image_id = _known_image(ann["image_id"], image_sizes, where)
        _known_category(ann["category_id"], category_names, where)
        segmentation = _to_rle(ann["segmentation"], image_sizes[image_id], where, allow_polygons=True)
        gt_annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": ann["category_id"],
                "segmentation": segmentation,
                "area": float(ann["area"]),
                "iscrowd": int(ann["iscrowd"]),
            }
        )

    dt_annotations = []
    for n, res in enumerate(results):
        where = f"result #{n} (image {res.get('image_id')!r}, category {res.get('category_id')!r})"
        _require_keys(res, ("image_id", "category_id", "segmentation", "score"), where)
        image_id = _known_image(res["image_id"], image_sizes, where)
        _known_category(res["category_id"], category_names, where)
        score = float(res["score"])
        if not np.isfinite(score):
            raise ValueError(f"mask_ap: {where}: score is {score}; give every result a finite score")
        dt_annotations.append(
            {
                "image_id": image_id,
                "category_id": res["category_id"],
                "segmentation": _to_rle(res["segmentation"], image_sizes[image_id], where, allow_polygons=False),
                "score": score,
            }
        )

    dataset = {
        "info": {"description": "xsam.eval.coco"},
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in image_sizes.items()],
        "categories": [{"id": c, "name": name} for c, name in category_names.items()],
        "annotations": gt_annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_annotations) if dt_annotations else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        if not use_categories:
            coco_eval.params.useCats = 0
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    stats = {
        name: float(value) * 100.0
        for name, value in zip(STAT_NAMES, coco_eval.stats[: len(STAT_NAMES)])
        if value >= 0
    }
    precision = np.asarray(coco_eval.eval["precision"])
    per_class: dict[str, float] = {}
    if use_categories:
        for k, category_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            if values.size:
                per_class[category_names[category_id]] = float(np.mean(values)) * 100.0
    return MaskAP(
        stats=stats,
        per_class=per_class,
        precision=precision,
        recall_thresholds=np.asarray(coco_eval.params.recThrs),
    )


def _image_sizes(images: Sequence[Mapping[str, Any]]) -> dict[Any, tuple[int, int]]:
    sizes: dict[Any, tuple[int, int]] = {}
    for n, image in enumerate(images):
        where = f"image #{n} (id {image.get('id')!r})"
        _require_keys(image, ("id", "width", "height"), where)
        if image["id"] in sizes:
            raise ValueError(f"mask_ap: {where}: the id appears twice in images; give each image once")
        height, width = int(image["height"]), int(image["width"])
        if height <= 0 or width <= 0:
            raise ValueError(f"mask_ap: {where}: size {height}x{width}; height and width must be positive")
        sizes[image["id"]] = (height, width)
    return sizes


def _category_names(categories: Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    if not categories:
        raise ValueError("mask_ap: no categories were given; pass the dataset's category table")
    names: dict[Any, str] = {}
    for n, category in enumerate(categories):
        where = f"category #{n} (id {category.get('id')!r})"
        _require_keys(category, ("id", "name"), where)
        if category["id"] in names:
            raise ValueError(f"mask_ap: {where}: the id appears twice in categories; give each category once")
        if category["name"] in names.values():
            raise ValueError(
                f"mask_ap: {where}: the name {category['name']!r} is used twice; per-class AP is keyed by "
                "name, so give each category its own name"
            )
        names[category["id"]] = str(category["name"])
    return names


def _require_keys(record: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"mask_ap: {where} lacks {missing}; add them (COCO format)")


def _known_image(image_id: Any, image_sizes: Mapping[Any, tuple[int, int]], where: str) -> Any:
    if image_id not in image_sizes:
        raise ValueError(
            f"mask_ap: {where}: image_id {image_id!r} is not in images; add the image to `images` "
            "or drop the record"
        )
    return image_id


def _known_category(category_id: Any, category_names: Mapping[Any, str], where: str) -> None:
    if category_id not in category_names:
        raise ValueError(
            f"mask_ap: {where}: category_id {category_id!r} is not in categories; map it onto the "
            "dataset's category ids or add the category"
        )


def _to_rle(
    segmentation: Any, image_size: tuple[int, int], where: str, *, allow_polygons: bool
) -> dict[str, Any]:
    """A compressed RLE of `segmentation` (counts as str), checked against the image's size."""
    height, width = image_size
    if isinstance(segmentation, list):
        if not allow_polygons:
            raise ValueError(
                f"mask_ap: {where}: the segmentation is a polygon list; encode result masks as RLE "
                "(pycocotools.mask.encode)"
            )
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, Mapping) and "size" in segmentation and "counts" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(
                f"mask_ap: {where}: mask size {size} (h, w) differs from the image size {[height, width]}; "
                "resize the mask to the image before encoding it"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        else:
            rle = {"size": size, "counts": counts}
    else:
        raise ValueError(
            f"mask_ap: {where}: segmentation must be an RLE {{'size': [h, w], 'counts': ...}}, got "
            f"{type(segmentation).__name__}"
        )
    if isinstance(rle["counts"], bytes):
        rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return rle


def _empty_results(coco_gt: COCO) -> COCO:
    """The result set with no detections (what `loadRes([])` would be if it accepted an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt
