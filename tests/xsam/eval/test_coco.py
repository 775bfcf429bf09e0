"""xsam.eval.coco.mask_ap against pycocotools called directly (GT JSON file -> COCO(path) -> loadRes ->
COCOeval), on real COCO annotations: image 439180's 32 RLE segments (panopticapi's detection-format
export, 2 crowd) and image 39769's 6 polygon instances converted to RLE."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from conftest import CORPORA
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from xsam.eval.coco import STAT_NAMES, MaskAP, mask_ap

RLE_GT = CORPORA / "coco_instances/annotations/panoptic_coco_detection_format.json"
POLYGON_GT = CORPORA / "coco_instances_polygons/annotations/instances_val2017.json"
CAT, REMOTE, PERSON, HORSE, TRUCK, COUCH = 17, 75, 1, 19, 8, 63


@pytest.fixture(scope="module")
def gt() -> dict:
    """Both images in one COCO ground truth, polygons turned into compressed RLE."""
    rle = json.loads(RLE_GT.read_text())
    poly = json.loads(POLYGON_GT.read_text())
    names = {c["id"]: c["name"] for c in rle["categories"]}
    assert all(names[c["id"]] == c["name"] for c in poly["categories"])  # the 80 things are a subset of the 133
    (image,) = poly["images"]
    for ann in poly["annotations"]:
        merged = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        ann["segmentation"] = {"size": [int(v) for v in merged["size"]], "counts": merged["counts"].decode()}
    assert len(rle["annotations"]) == 32 and sum(a["iscrowd"] for a in rle["annotations"]) == 2
    return {
        "images": rle["images"] + poly["images"],
        "annotations": rle["annotations"] + poly["annotations"],
        "categories": rle["categories"],
    }


def gt_as_results(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def shifted(segmentation: dict, dx: int) -> dict:
    mask = mask_utils.decode(segmentation)
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :-dx]
    rle = mask_utils.encode(np.asfortranarray(out))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def perturbed(gt: dict) -> list[dict]:
    """GT as results, then: a person dropped, a horse shifted 10 px (IoU 0.49), a cat shifted 20 px
    (IoU 0.70), a remote labelled cat, a horse labelled person, lower scores on some true positives."""
    results = []
    for res in gt_as_results(gt):
        ann_id = next(a["id"] for a in gt["annotations"] if a["segmentation"] is res["segmentation"])
        if ann_id == 20:
            continue
        if ann_id == 34:
            res["segmentation"], res["score"] = shifted(res["segmentation"], 10), 0.9
        if ann_id == 2190839:
            res["segmentation"] = shifted(res["segmentation"], 20)
        if ann_id == 1108446:
            res["category_id"] = CAT
        if ann_id == 35:
            res["category_id"] = PERSON
        if ann_id in (18, 33, 1605237):
            res["score"] = {18: 0.2, 33: 0.5, 1605237: 0.4}[ann_id]
        results.append(res)
    return results


def reference(tmp_path, gt: dict, results: list[dict], *, use_cats: bool = True, cat_ids=None) -> COCOeval:
    """pycocotools the documented way: the GT as a JSON file, loadRes on the result list."""
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "segm")
        coco_eval.params.useCats = int(use_cats)
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def reference_stats(coco_eval: COCOeval) -> dict[str, float]:
    return {name: float(v) * 100 for name, v in zip(STAT_NAMES, coco_eval.stats[:6]) if v >= 0}


def test_ground_truth_as_results_scores_100(gt):
    got = mask_ap(gt["images"], gt["annotations"], gt["categories"], gt_as_results(gt))
    assert isinstance(got, MaskAP)
    assert set(got.stats) == set(STAT_NAMES)  # both images together have small, medium and large objects
    assert got.stats == pytest.approx({name: 100.0 for name in STAT_NAMES})
    assert set(got.per_class) == {"person", "truck", "horse", "gravel", "tree-merged", "sky-other-merged",
                                  "grass-merged", "cat", "couch", "bed", "remote"}
    assert got.per_class == pytest.approx({name: 100.0 for name in got.per_class})
    assert got.precision.shape == (10, 101, 133, 4, 3)
    assert got.recall_thresholds.shape == (101,) and got.recall_thresholds[-1] == 1.0


def test_perturbed_results_match_pycocotools(gt, tmp_path):
    results = perturbed(gt)
    before = copy.deepcopy(results)
    got = mask_ap(gt["images"], gt["annotations"], gt["categories"], results)
    assert results == before  # loadRes adds id / area / bbox to its input; ours is left alone

    ref = reference(tmp_path, gt, results)
    assert got.stats == reference_stats(ref)
    assert np.array_equal(got.precision, ref.eval["precision"])
    assert 0 < got.stats["AP"] < got.stats["AP50"] < 100
    # per-class AP, each against a COCOeval restricted to that one category
    for cat_id, name in [(PERSON, "person"), (HORSE, "horse"), (CAT, "cat"), (REMOTE, "remote"),
                         (TRUCK, "truck"), (COUCH, "couch")]:
        assert got.per_class[name] == pytest.approx(reference(tmp_path, gt, results, cat_ids=[cat_id]).stats[0] * 100,
                                                    rel=1e-12, abs=1e-12), name
    assert got.per_class["bed"] == pytest.approx(100.0)
    assert got.per_class["remote"] < 100 and got.per_class["cat"] < 100


def test_class_agnostic(gt, tmp_path):
    results = perturbed(gt)
    got = mask_ap(gt["images"], gt["annotations"], gt["categories"], results, use_categories=False)
    ref = reference(tmp_path, gt, results, use_cats=False)
    assert got.stats == reference_stats(ref)
    assert got.per_class == {}
    assert got.precision.shape[2] == 1
    # relabelled masks still match when labels are ignored
    aware = mask_ap(gt["images"], gt["annotations"], gt["categories"], results)
    assert got.stats["AP50"] > aware.stats["AP50"]


def test_result_bbox_is_not_used_for_areas(gt):
    """detectron2 drops a result's bbox before "segm" evaluation; loadRes would size it by the box."""
    results = perturbed(gt)
    with_boxes = [dict(r, bbox=[0.0, 0.0, 1.0, 1.0]) for r in results]
    plain = mask_ap(gt["images"], gt["annotations"], gt["categories"], results)
    boxed = mask_ap(gt["images"], gt["annotations"], gt["categories"], with_boxes)
    assert boxed.stats == plain.stats


def test_missing_sizes_are_left_out(gt, tmp_path):
    """Image 39769 alone has no small object: COCOeval reports APs = -1, which is not in stats."""
    image = [i for i in gt["images"] if i["id"] == 39769]
    anns = [a for a in gt["annotations"] if a["image_id"] == 39769]
    results = [r for r in perturbed(gt) if r["image_id"] == 39769]
    got = mask_ap(image, anns, gt["categories"], results)
    ref = reference(tmp_path, {"images": image, "annotations": anns, "categories": gt["categories"]}, results)
    assert ref.stats[3] == -1
    assert "APs" not in got.stats
    assert got.stats == reference_stats(ref)


def test_empty_results(gt):
    got = mask_ap(gt["images"], gt["annotations"], gt["categories"], [])
    assert got.stats == {name: 0.0 for name in STAT_NAMES}
    assert got.per_class and set(got.per_class.values()) == {0.0}
    assert got.precision.shape == (10, 101, 133, 4, 3)


def test_errors_name_the_record(gt):
    images, anns, cats = gt["images"], gt["annotations"], gt["categories"]
    good = gt_as_results(gt)

    with pytest.raises(ValueError, match=r"image_id 123 is not in images"):
        mask_ap(images, anns, cats, good + [dict(good[0], image_id=123)])
    with pytest.raises(ValueError, match=r"category_id 999 is not in categories"):
        mask_ap(images, anns, cats, good + [dict(good[0], category_id=999)])
    small = mask_utils.encode(np.asfortranarray(np.ones((10, 20), dtype=np.uint8)))
    wrong_size = {"size": [10, 20], "counts": small["counts"].decode()}
    with pytest.raises(ValueError, match=r"result #\d+ \(image 439180.*mask size \[10, 20\].*\[360, 640\]"):
        mask_ap(images, anns, cats, good + [dict(good[0], segmentation=wrong_size)])
    with pytest.raises(ValueError, match=r"ground-truth annotation #0 \(id 18.*image_id 7 is not in images"):
        mask_ap(images, [dict(anns[0], image_id=7)] + anns[1:], cats, good)
    with pytest.raises(ValueError, match=r"ids must be unique and non-zero"):
        mask_ap(images, [dict(anns[0], id=0)] + anns[1:], cats, good)
    with pytest.raises(ValueError, match=r"lacks \['score'\]"):
        mask_ap(images, anns, cats, [{k: v for k, v in good[0].items() if k != "score"}])
    with pytest.raises(ValueError, match=r"polygon list; encode result masks as RLE"):
        mask_ap(images, anns, cats, [dict(good[0], segmentation=[[0, 0, 5, 0, 5, 5]])])
