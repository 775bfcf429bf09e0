"""cIoU / gIoU / N-acc / T-acc (xsam.eval.referring) on hand cases and on real COCO instance masks.

No callable GRES or LISA evaluator installs here (both need torch + detectron2 / a model), so the
references are: arithmetic written out by hand, `_gres`, a line-by-line transcription of the
branching in ReLA's `gres_model/evaluation/refer_evaluation.py::ReferEvaluator.evaluate` (with
`gt_nt` / `pred_nt` read off the masks, as the module documents), and golden numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CORPORA
from pycocotools import mask as mask_utils

from xsam.eval.referring import MaskScore, ReferringMetrics, intersection_union

INSTANCES = CORPORA / "coco_instances_polygons" / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def instances() -> dict[int, np.ndarray]:
    """The 6 polygon instances of image 39769 (640x480), annotation id -> bool mask."""
    data = json.loads(INSTANCES.read_text())
    (image,) = data["images"]
    h, w = image["height"], image["width"]
    out = {}
    for ann in data["annotations"]:
        rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
        out[ann["id"]] = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    return out


# Annotation ids of image 39769: two remotes, a couch, a bed and two cats.
REMOTE, REMOTE2, COUCH, BED, CAT, CAT2 = 1108446, 1110067, 1605237, 1612051, 2190839, 2190842


def _shift_right(mask: np.ndarray, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :-dx]
    return out


def _gres(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """GRES's evaluate() for one source, transcribed branch by branch (pred_nt := pred.sum() == 0,
    gt_nt := gt.sum() == 0); values in percent, N_acc / T_acc only when GRES computes them."""
    acc_i = acc_u = 0
    acc_iou = 0.0
    nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
    empty_count = 0
    for pred, gt in pairs:
        i = int(np.sum(np.logical_and(pred, gt)))
        u = int(np.sum(np.logical_or(pred, gt)))
        pred_nt, gt_nt = pred.sum() == 0, gt.sum() == 0
        if gt_nt:
            empty_count += 1
            if pred_nt:
                nt["TP"] += 1
                acc_iou += 1
            else:
                nt["FN"] += 1
                acc_u += u
        else:
            if pred_nt:
                nt["FP"] += 1
                i = 0
            else:
                nt["TN"] += 1
            acc_iou += 0.0 if u == 0 else i / u
            acc_i += i
            acc_u += u
    out = {"gIoU": 100.0 * acc_iou / len(pairs), "cIoU": 100.0 * acc_i / acc_u}
    if empty_count:
        out["T-acc"] = 100.0 * nt["TN"] / (nt["TN"] + nt["FP"])
        out["N-acc"] = 100.0 * nt["TP"] / (nt["TP"] + nt["FN"])
    return out


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------- intersection_union


def test_intersection_union_by_hand_and_with_ignore():
    pred = _box(4, 5, 0, 2, 0, 3)  # rows 0-1, cols 0-2: 6 px
    gt = _box(4, 5, 1, 3, 1, 4)  # rows 1-2, cols 1-3: 6 px
    # overlap: row 1, cols 1-2 = 2 px; union = 6 + 6 - 2 = 10
    assert intersection_union(pred, gt) == (2, 10)
    # ignore column 1 (rows 0-3): removes 1 px of the overlap (row 1) and, from the union, rows 0, 1, 2 of
    # column 1 (pred row 0, both row 1, gt row 2) = 3 px -> (1, 7)
    ignore = _box(4, 5, 0, 4, 1, 2)
    assert intersection_union(pred, gt, ignore) == (1, 7)
    assert intersection_union(pred.astype(np.uint8), gt.astype(np.int64)) == (2, 10)


def test_intersection_union_rejects_mismatched_and_non_mask_inputs():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        intersection_union(np.zeros((4, 5), bool), np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="ignore has shape"):
        intersection_union(np.zeros((4, 5), bool), np.zeros((4, 5), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="dtype float"):
        intersection_union(np.full((4, 5), 0.7), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="outside 0/1"):
        intersection_union(np.full((4, 5), 255, np.uint8), np.zeros((4, 5), bool))


# ---------------------------------------------------------------- hand cases


def test_grefcoco_outcomes_by_hand():
    h, w = 4, 6
    empty = np.zeros((h, w), bool)
    gt_d = _box(h, w, 0, 2, 0, 2)  # 4 px
    pred_d = _box(h, w, 1, 3, 1, 4)  # rows 1-2, cols 1-3: 6 px; overlap with gt_d: pixel (1, 1)
    metrics = ReferringMetrics(no_target=True)
    a = metrics.add("img1/a", None, empty)  # no-target, predicted empty: I 0, U 0, IoU 1
    b = metrics.add("img1/b", _box(h, w, 0, 1, 0, 3), empty)  # no-target, 3 px predicted: I 0, U 3, IoU 0
    c = metrics.add("img2/c", empty, gt_d)  # target, predicted empty: I 0, U 4, IoU 0
    d = metrics.add("img2/d", pred_d, gt_d)  # target: I = |{(1,1)}| = 1, U = 4 + 6 - 1 = 9, IoU 1/9
    e = metrics.add("img3/e", gt_d, gt_d)  # target, exact: I 4, U 4, IoU 1
    assert (a.intersection, a.union, a.iou, a.gt_empty, a.pred_empty) == (0, 0, 1.0, True, True)
    assert (b.intersection, b.union, b.iou, b.gt_empty, b.pred_empty) == (0, 3, 0.0, True, False)
    assert (c.intersection, c.union, c.iou, c.gt_empty, c.pred_empty) == (0, 4, 0.0, False, True)
    assert (d.intersection, d.union, d.gt_empty, d.pred_empty) == (1, 9, False, False)
    assert d.iou == pytest.approx(1 / 9)
    assert (e.intersection, e.union, e.iou) == (4, 4, 1.0)
    res = metrics.result()
    # cIoU = (0+0+0+1+4) / (0+3+4+9+4) = 5/20 = 25 %
    # gIoU = (1 + 0 + 0 + 1/9 + 1) / 5 = (19/9) / 5 = 42.2222 %
    # N-acc: no-target a (empty: right), b (not empty: wrong) -> 1/2 = 50 %
    # T-acc: target c (empty: wrong), d, e (non-empty: right) -> 2/3 = 66.6667 %
    assert res == pytest.approx({"cIoU": 25.0, "gIoU": 100 * 19 / 45, "N-acc": 50.0, "T-acc": 200 / 3}, abs=1e-9)
    pairs = [(np.zeros((h, w), bool), empty), (_box(h, w, 0, 1, 0, 3), empty), (empty, gt_d), (pred_d, gt_d), (gt_d, gt_d)]
    assert res == pytest.approx(_gres(pairs), abs=1e-6)
    assert [s.key for s in metrics.samples] == ["img1/a", "img1/b", "img2/c", "img2/d", "img3/e"]
    assert isinstance(metrics.samples[0], MaskScore)


def test_accuracies_are_absent_rather_than_invented():
    gt = _box(3, 3, 0, 2, 0, 2)
    only_targets = ReferringMetrics(no_target=True)
    only_targets.add("a", gt, gt)
    assert set(only_targets.result()) == {"cIoU", "gIoU", "T-acc"}  # no no-target expression: no N-acc
    only_empty = ReferringMetrics(no_target=True)
    only_empty.add("a", None, np.zeros((3, 3), bool))
    # every union is 0: cIoU = 0/0 is undefined (GRES divides by zero), gIoU = 100, N-acc = 1/1
    assert only_empty.result() == {"gIoU": 100.0, "N-acc": 100.0}
    refseg = ReferringMetrics()
    refseg.add("a", gt, gt)
    assert set(refseg.result()) == {"cIoU", "gIoU"}


def test_emptiness_is_read_before_the_ignore_region():
    gt = _box(4, 4, 0, 2, 0, 2)
    pred = _box(4, 4, 3, 4, 3, 4)  # one pixel, inside the ignore region
    ignore = _box(4, 4, 2, 4, 2, 4)
    metrics = ReferringMetrics(no_target=True)
    score = metrics.add("a", pred, np.zeros((4, 4), bool), ignore=ignore)
    # the prediction is not empty (1 px on the full mask) although it adds nothing to U
    assert (score.pred_empty, score.intersection, score.union, score.iou) == (False, 0, 0, 0.0)
    score = metrics.add("b", pred, gt, ignore=ignore)
    assert (score.intersection, score.union, score.iou) == (0, 4, 0.0)


def test_groups_are_reported_in_sorted_order():
    gt = _box(4, 4, 0, 2, 0, 2)  # 4 px
    metrics = ReferringMetrics()
    metrics.add("s1", gt, gt, group="scribble")  # I 4 U 4
    metrics.add("p1", _box(4, 4, 0, 2, 0, 1), gt, group="point")  # I 2 U 4
    metrics.add("p2", _box(4, 4, 0, 4, 0, 2), gt, group="point")  # I 4 U 8
    metrics.add("x", None, gt)  # no group: counts in the totals only; I 0 U 4
    res = metrics.result()
    assert list(res) == ["cIoU", "gIoU", "point/cIoU", "point/gIoU", "scribble/cIoU", "scribble/gIoU"]
    assert res["cIoU"] == pytest.approx(100 * 10 / 20)  # (4+2+4+0) / (4+4+8+4)
    assert res["gIoU"] == pytest.approx(100 * (1 + 0.5 + 0.5 + 0) / 4)
    assert res["point/cIoU"] == pytest.approx(100 * 6 / 12)
    assert res["point/gIoU"] == pytest.approx(50.0)
    assert res["scribble/cIoU"] == res["scribble/gIoU"] == 100.0


# ---------------------------------------------------------------- real masks


def test_ground_truth_against_itself_is_perfect(instances):
    metrics = ReferringMetrics(no_target=True)
    for ann_id, mask in instances.items():
        metrics.add(f"39769/{ann_id}", mask, mask)
    metrics.add("39769/both-cats", instances[CAT] | instances[CAT2], instances[CAT] | instances[CAT2])
    metrics.add("39769/no-target", None, np.zeros_like(instances[CAT]))
    assert metrics.result() == {"cIoU": 100.0, "gIoU": 100.0, "N-acc": 100.0, "T-acc": 100.0}


def test_shifted_and_dropped_masks_on_real_instances(instances):
    cat, cat2 = instances[CAT], instances[CAT2]
    shifted = _shift_right(cat, 10)
    metrics = ReferringMetrics()
    s = metrics.add("39769/cat-shifted", shifted, cat)
    # independent counts
    i_shift = int(np.logical_and(shifted, cat).sum())
    u_shift = int(np.logical_or(shifted, cat).sum())
    assert (s.intersection, s.union) == (i_shift, u_shift)
    # golden: computed once with the lines above on pycocotools' decode of annotation 2190839,
    # shifted 10 px right with zero fill
    assert (i_shift, u_shift) == (48515, 58097)
    both = cat | cat2
    d = metrics.add("39769/two-cats-one-found", cat2, both)  # a multi-object expression, one object dropped
    # the cats do not overlap: I = |cat2| = 59710, U = |cat| + |cat2| = 53306 + 59710 = 113016
    assert (d.intersection, d.union) == (int(cat2.sum()), int(both.sum())) == (59710, 113016)
    res = metrics.result()
    assert res["cIoU"] == pytest.approx(100 * (48515 + 59710) / (58097 + 113016), abs=1e-9)
    assert res["gIoU"] == pytest.approx(50 * (48515 / 58097 + 59710 / 113016), abs=1e-9)
    # golden values of the two lines above: 63.24767843471858 and 68.17006039853342
    assert res["cIoU"] == pytest.approx(63.24767843471858, abs=1e-9)
    assert res["gIoU"] == pytest.approx(68.17006039853342, abs=1e-9)


def test_grefcoco_mix_on_real_instances_matches_the_gres_loop(instances):
    empty = np.zeros_like(instances[CAT])
    both = instances[CAT] | instances[CAT2]
    pairs = {
        "39769/two-cats": (both, both),  # target found exactly
        "39769/cat-shifted": (_shift_right(instances[CAT], 10), instances[CAT]),  # target, partly found
        "39769/remote-missed": (empty, instances[REMOTE]),  # target predicted empty
        "39769/dog": (empty, empty),  # no-target, predicted empty
        "39769/horse": (instances[COUCH], empty),  # no-target, the couch predicted
        "39769/bed-as-couch": (instances[COUCH], instances[BED]),  # target, wrong object
    }
    metrics = ReferringMetrics(no_target=True)
    for key, (pred, gt) in pairs.items():
        metrics.add(key, None if key == "39769/dog" else pred, gt)
    res = metrics.result()
    expected = _gres(list(pairs.values()))
    assert res == pytest.approx(expected, abs=1e-6)
    assert res["N-acc"] == 50.0 and res["T-acc"] == 75.0  # dog right, horse wrong; 3 of 4 targets non-empty


def test_lisa_epsilon_does_not_matter_on_real_masks(instances):
    """LISA divides by U + 1e-5; on real masks (U in the thousands) that is below 1e-6 percent."""
    metrics = ReferringMetrics()
    lisa = []
    for shift, (key, mask) in enumerate(instances.items(), start=3):
        pred = _shift_right(mask, shift)
        s = metrics.add(str(key), pred, mask)
        lisa.append(s.intersection / (s.union + 1e-5))
    assert metrics.result()["gIoU"] == pytest.approx(100 * np.mean(lisa), abs=1e-6)


# ---------------------------------------------------------------- merge and errors


def test_merge_equals_one_accumulator(instances):
    items = [(f"39769/{k}", _shift_right(m, 7) if k % 2 else None, m) for k, m in instances.items()]
    items.append(("39769/none", None, np.zeros_like(instances[CAT])))
    whole = ReferringMetrics(no_target=True)
    parts = [ReferringMetrics(no_target=True), ReferringMetrics(no_target=True)]
    for n, (key, pred, gt) in enumerate(items):
        group = "even" if n % 2 == 0 else "odd"
        whole.add(key, pred, gt, group=group)
        parts[n % 2].add(key, pred, gt, group=group)
    parts[0].merge(parts[1])
    assert parts[0].result() == pytest.approx(whole.result(), abs=1e-12)
    assert sorted(s.key for s in parts[0].samples) == sorted(s.key for s in whole.samples)


def test_errors_name_the_sample_and_the_fix():
    gt = _box(4, 4, 0, 2, 0, 2)
    metrics = ReferringMetrics()
    metrics.add("img7/expr3", gt, gt)
    with pytest.raises(ValueError, match=r"'img7/expr3' was added twice.*separator"):
        metrics.add("img7/expr3", gt, gt)
    with pytest.raises(ValueError, match=r"sample 'img7/expr4'.*\(4, 4\).*\(3, 4\)"):
        metrics.add("img7/expr4", np.zeros((4, 4), bool), np.zeros((3, 4), bool))
    assert [s.key for s in metrics.samples] == ["img7/expr3"]  # failed adds keep nothing
    other = ReferringMetrics()
    other.add("img7/expr3", gt, gt)
    with pytest.raises(ValueError, match=r"img7/expr3.*one rank"):
        metrics.merge(other)
    assert len(metrics.samples) == 1
    with pytest.raises(ValueError, match="no_target"):
        metrics.merge(ReferringMetrics(no_target=True))
    with pytest.raises(ValueError, match="no samples were scored"):
        ReferringMetrics().result()
