"""mIoU / fwIoU / mACC / pACC (xsam.eval.semantic) on a hand case and on the real COCO panoptic PNG.

detectron2 is not installed here, so `_detectron2` below recomputes SemSegEvaluator's numbers the way
`detectron2/evaluation/sem_seg_evaluation.py` does (bincount of (n+1)*pred + gt with ignored ground
truth moved to n, then sums over `[:-1, :-1]`), written independently of the module under test. It
applies to argmax-style predictions (no "no class" pixel); "no class" is checked by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CORPORA
from PIL import Image

from xsam.eval.semantic import SemanticMetrics

PANOPTIC = CORPORA / "coco_panoptic" / "annotations"


def _detectron2(pairs: list[tuple[np.ndarray, np.ndarray]], n: int, ignore: int = 255) -> dict:
    conf = np.zeros((n + 1, n + 1), np.int64)
    for pred, gt in pairs:
        gt = np.where(gt == ignore, n, gt).astype(np.int64)
        conf += np.bincount(((n + 1) * pred.astype(np.int64) + gt).ravel(), minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(axis=0).astype(float)
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(float)
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou = np.divide(tp, union, out=np.full(n, np.nan), where=iou_valid)
    acc = np.divide(tp, pos_gt, out=np.full(n, np.nan), where=acc_valid)
    return {
        "confusion": conf,
        "result": {
            "mIoU": 100 * iou[iou_valid].sum() / iou_valid.sum(),
            "fwIoU": 100 * (iou[iou_valid] * (pos_gt / pos_gt.sum())[iou_valid]).sum(),
            "mACC": 100 * acc[acc_valid].sum() / acc_valid.sum(),
            "pACC": 100 * tp.sum() / pos_gt.sum(),
        },
        "iou": {str(i): 100 * iou[i] for i in np.flatnonzero(iou_valid)},
    }


@pytest.fixture(scope="module")
def panoptic() -> dict:
    """Image 439180 as a semantic label map: contiguous category index (position in the 133 sorted
    category ids) per pixel, void (id 0) and crowd segments -> 255 (X-SAM's miou.py skips iscrowd)."""
    data = json.loads((PANOPTIC / "panoptic_val2017.json").read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    index = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    names = {c["id"]: c["name"] for c in data["categories"]}
    (ann,) = data["annotations"]
    rgb = np.asarray(Image.open(PANOPTIC / "panoptic_val2017" / ann["file_name"]).convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    labels = np.full(ids.shape, 255, np.int64)
    for seg in ann["segments_info"]:
        if not seg["iscrowd"]:
            labels[ids == seg["id"]] = index[seg["category_id"]]
    return {
        "labels": labels,
        "ids": ids,
        "names": [names[c] for c in cat_ids],
        "index": index,
        "segments": {s["id"]: s for s in ann["segments_info"]},
    }


def _argmax_like(labels: np.ndarray, fill: int) -> np.ndarray:
    """A prediction with a class everywhere, as an argmax gives: unlabelled pixels get `fill`."""
    return np.where(labels == 255, fill, labels)


# ---------------------------------------------------------------- hand case


def test_hand_3x3_case():
    gt = np.array([[0, 0, 1], [1, 1, 2], [2, 255, 0]])
    pred = np.array([[0, 1, 1], [1, 255, 2], [2, 2, 0]])
    metrics = SemanticMetrics(3, class_names=["a", "b", "c"])
    metrics.add(pred, gt)
    # (gt, pred) per pixel: (0,0) (0,1) (1,1) | (1,1) (1,none) (2,2) | (2,2) (ignored,2) (0,0)
    expected = np.zeros((4, 4), np.int64)  # [pred, gt], index 3 = no class / ignored
    expected[0, 0] = 2
    expected[1, 0] = 1
    expected[1, 1] = 2
    expected[3, 1] = 1
    expected[2, 2] = 2
    expected[2, 3] = 1
    assert np.array_equal(metrics.confusion, expected)
    assert metrics.confusion.dtype == np.int64
    # a: GT 3, TP 2, predicted 2 -> IoU 2/(3+2-2) = 2/3, ACC 2/3
    # b: GT 3 (one of them "no class"), TP 2, predicted 3 -> IoU 2/4, ACC 2/3
    # c: GT 2, TP 2, predicted 2 (the third 2 is on an ignored pixel) -> IoU 1, ACC 1
    assert metrics.per_class_iou() == pytest.approx({"a": 200 / 3, "b": 50.0, "c": 100.0})
    assert metrics.result() == pytest.approx(
        {
            "mIoU": 100 * (2 / 3 + 1 / 2 + 1) / 3,  # 72.22
            "fwIoU": 100 * (3 * 2 / 3 + 3 * 1 / 2 + 2 * 1) / 8,  # 68.75
            "mACC": 100 * (2 / 3 + 2 / 3 + 1) / 3,  # 77.78
            "pACC": 100 * 6 / 8,  # 75
        }
    )


def test_class_without_ground_truth_is_left_out_of_the_means():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 3], [1, 1]])  # class 3 is predicted once, never in the ground truth; 2 never appears
    metrics = SemanticMetrics(4)
    metrics.add(pred, gt)
    # class 0: GT 2, TP 1, predicted 1 -> IoU 1/2; class 1: IoU 1; classes 2 and 3 have no GT: excluded
    assert metrics.per_class_iou() == {"0": 50.0, "1": 100.0}
    assert metrics.result() == pytest.approx({"mIoU": 75.0, "fwIoU": 75.0, "mACC": 75.0, "pACC": 75.0})
    assert metrics.result() == pytest.approx(_detectron2([(pred, gt)], 4)["result"])


# ---------------------------------------------------------------- real panoptic PNG


def test_ground_truth_against_itself_is_perfect(panoptic):
    labels = panoptic["labels"]
    metrics = SemanticMetrics(133, class_names=panoptic["names"])
    metrics.add(labels, labels, key="439180")
    assert metrics.result() == {"mIoU": 100.0, "fwIoU": 100.0, "mACC": 100.0, "pACC": 100.0}
    present = ["person", "truck", "horse", "gravel", "tree-merged", "sky-other-merged", "grass-merged"]
    assert sorted(metrics.per_class_iou()) == sorted(present)
    assert set(metrics.per_class_iou().values()) == {100.0}
    # void (7189 px) and the two crowd segments (7839 + 421 px) are ignored
    assert metrics.confusion[:, -1].sum() == 7189 + 7839 + 421 == int((labels == 255).sum())


def test_swapped_segment_label_matches_detectron2(panoptic):
    labels, ids, index = panoptic["labels"], panoptic["ids"], panoptic["index"]
    pred = _argmax_like(labels, index[193])  # unlabelled pixels predicted as grass
    pred[ids == 6094848] = index[19]  # one truck (5791 px) labelled horse
    metrics = SemanticMetrics(133)
    metrics.add(pred, labels)
    reference = _detectron2([(pred, labels)], 133)
    assert np.array_equal(metrics.confusion, reference["confusion"])
    assert metrics.result() == pytest.approx(reference["result"], abs=1e-9)
    assert metrics.per_class_iou() == pytest.approx(reference["iou"], abs=1e-9)
    # by hand: truck keeps 1680 of 1680 + 5791 px and is predicted nowhere else
    truck = metrics.per_class_iou()[str(index[8])]
    assert truck == pytest.approx(100 * 1680 / (1680 + 5791))
    horse_gt = int((labels == index[19]).sum())
    assert metrics.per_class_iou()[str(index[19])] == pytest.approx(100 * horse_gt / (horse_gt + 5791))


def test_shifted_map_matches_detectron2(panoptic):
    labels, index = panoptic["labels"], panoptic["index"]
    # shift 5 px down and 7 px right, repeating the top rows / left columns (every pixel keeps a label)
    pred = np.pad(labels, ((5, 0), (7, 0)), mode="edge")[: labels.shape[0], : labels.shape[1]]
    pred = _argmax_like(pred, index[184])  # unlabelled -> tree
    metrics = SemanticMetrics(133, class_names=panoptic["names"])
    metrics.add(pred, labels)
    reference = _detectron2([(pred, labels)], 133)
    assert np.array_equal(metrics.confusion, reference["confusion"])
    assert metrics.result() == pytest.approx(reference["result"], abs=1e-9)
    names = panoptic["names"]
    assert metrics.per_class_iou() == pytest.approx({names[int(i)]: v for i, v in reference["iou"].items()}, abs=1e-9)
    assert metrics.result()["mIoU"] < 100.0


def test_no_class_prediction_is_a_miss_and_ignored_ground_truth_is_skipped(panoptic):
    labels, ids, index = panoptic["labels"], panoptic["ids"], panoptic["index"]
    rng = np.random.default_rng(0)
    # any prediction on ignored ground truth changes nothing
    noise = np.where(labels == 255, rng.integers(0, 133, labels.shape), labels)
    metrics = SemanticMetrics(133)
    metrics.add(noise, labels)
    assert metrics.result() == {"mIoU": 100.0, "fwIoU": 100.0, "mACC": 100.0, "pACC": 100.0}

    pred = labels.copy()
    pred[ids == 16758454] = 255  # one horse (4363 px): the model predicts no class there
    metrics = SemanticMetrics(133)
    metrics.add(pred, labels)
    horse = index[19]
    horse_gt = int((labels == horse).sum())
    valid = int((labels != 255).sum())
    assert metrics.confusion[133, horse] == 4363  # the extra row: predicted "no class"
    iou = metrics.per_class_iou()
    # horse: TP = horse_gt - 4363, GT = horse_gt, predicted = horse_gt - 4363 -> IoU = ACC = TP / GT
    assert iou[str(horse)] == pytest.approx(100 * (horse_gt - 4363) / horse_gt)
    assert {k: v for k, v in iou.items() if k != str(horse)} == dict.fromkeys(
        [str(i) for i in sorted(set(np.unique(labels).tolist()) - {255, horse})], 100.0
    )
    n = len(iou)
    horse_iou = (horse_gt - 4363) / horse_gt
    assert metrics.result() == pytest.approx(
        {
            "mIoU": 100 * (n - 1 + horse_iou) / n,
            "fwIoU": 100 * (valid - horse_gt + horse_gt * horse_iou) / valid,
            "mACC": 100 * (n - 1 + horse_iou) / n,
            "pACC": 100 * (valid - 4363) / valid,
        }
    )


def test_merge_equals_one_accumulator(panoptic):
    labels, index = panoptic["labels"], panoptic["index"]
    shifted = np.roll(labels, 9, axis=1)
    images = [(shifted[:180], labels[:180]), (labels[180:], labels[180:]), (_argmax_like(labels, index[1]), labels)]
    whole = SemanticMetrics(133)
    ranks = [SemanticMetrics(133), SemanticMetrics(133)]
    for n, (pred, gt) in enumerate(images):
        whole.add(pred, gt)
        ranks[n % 2].add(pred, gt)
    ranks[0].merge(ranks[1])
    assert np.array_equal(ranks[0].confusion, whole.confusion)
    assert ranks[0].result() == whole.result()
    with pytest.raises(ValueError, match="num_classes=150"):
        whole.merge(SemanticMetrics(150))


# ---------------------------------------------------------------- errors


def test_errors_name_the_value_and_the_fix():
    metrics = SemanticMetrics(3)
    gt = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match=r"sample 'img9': pred has label 7 .*allowed: 0\.\.2 or ignore_value=255"):
        metrics.add(np.array([[0, 7], [1, 2]]), gt, key="img9")
    with pytest.raises(ValueError, match=r"gt has label -1"):
        metrics.add(gt, np.array([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match=r"\(2, 2\) but gt has shape \(2, 3\)"):
        metrics.add(gt, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="dtype float"):
        metrics.add(gt.astype(float), gt)
    assert metrics.confusion.sum() == 0  # nothing was counted
    with pytest.raises(ValueError, match="no ground-truth pixels"):
        metrics.result()
    metrics.add(gt, np.full((2, 2), 255))
    with pytest.raises(ValueError, match="no ground-truth pixels"):
        metrics.result()
    with pytest.raises(ValueError, match="ignore_value=2 is a class label"):
        SemanticMetrics(3, ignore_value=2)
    with pytest.raises(ValueError, match="class_names has 2 names"):
        SemanticMetrics(3, class_names=["a", "b"])
