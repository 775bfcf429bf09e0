"""Tests of xsam.eval.panoptic: Panoptic Quality as panopticapi's `evaluation.py` defines it.

panopticapi is not installed here, so every expected number is derived independently:
- on the real COCO panoptic val2017 image 439180 (32 segments: 13 persons + 1 person crowd, 2 trucks,
  11 horses + 1 horse crowd, gravel, tree-merged, sky-other-merged, grass-merged; 7189 VOID pixels),
  ground truth against itself and known perturbations of it, with the expected per-category numbers
  written by hand from pixel counts and, for whole results, `reference_counts` below (one boolean mask
  per segment and np.count_nonzero per same-category pair; no shared code with the module);
- the same numbers are committed in golden/panoptic.json, whose "provenance" says how they were made;
- 4x4 maps whose arithmetic is written in the comments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPORA
from PIL import Image

from xsam.eval.panoptic import PanopticMetrics, PanopticSegment, id_to_rgb, rgb_to_id

ANNOTATIONS = CORPORA / "coco_panoptic" / "annotations"
GOLDEN = Path(__file__).resolve().parent / "golden" / "panoptic.json"
PANOPTICAPI_COMMIT = "7bb4655548f98f3fedc07bf37e9040a992b054b0"

# Segment ids of image 439180 used below (category in brackets, area in pixels).
PERSON_A = 3937500  # [person] 3512
PERSON_B = 5119213  # [person] 2493
PERSON_C = 4070338  # [person] 2955
PERSON_CROWD = 5120499  # [person, iscrowd] 7839
HORSE_CROWD = 16175517  # [horse, iscrowd] 421
TRUCK_SMALL = 4587520  # [truck] 1680
SKY = 11829830  # [sky-other-merged] 12912
TREE = 2330219  # [tree-merged] 91045
GRASS = 10025880  # [grass-merged] 40197
PERSON, TRUCK, HORSE = 1, 8, 19
NEW_ID = 1  # not a segment id of the image


# ----------------------------------------------------------------------------------------- real sample


@dataclass(kw_only=True, slots=True)
class Sample:
    categories: list[dict]
    ids: np.ndarray  # H x W int64 segment ids
    segments: list[PanopticSegment]


def load_sample() -> Sample:
    doc = json.loads((ANNOTATIONS / "panoptic_val2017.json").read_text())
    (annotation,) = doc["annotations"]
    png = np.array(Image.open(ANNOTATIONS / "panoptic_val2017" / annotation["file_name"]))
    segments = [
        PanopticSegment(id=s["id"], category_id=s["category_id"], iscrowd=bool(s["iscrowd"]))
        for s in annotation["segments_info"]
    ]
    return Sample(categories=doc["categories"], ids=rgb_to_id(png), segments=segments)


@pytest.fixture(scope="module")
def sample() -> Sample:
    return load_sample()


@dataclass(kw_only=True, slots=True)
class Perturbed:
    pred_ids: np.ndarray
    pred_segments: list[PanopticSegment]
    reference: dict[int, dict]  # reference_counts of the case


@pytest.fixture(scope="module")
def perturbed(sample: Sample) -> dict[str, Perturbed]:
    """Every case of CASES, built once, with its reference counts."""
    out = {}
    for name, case in CASES.items():
        pred_ids, pred_segments = case(sample)
        reference = reference_counts(sample.ids, sample.segments, pred_ids, pred_segments)
        out[name] = Perturbed(pred_ids=pred_ids, pred_segments=pred_segments, reference=reference)
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def without(segments: list[PanopticSegment], *seg_ids: int) -> list[PanopticSegment]:
    return [s for s in segments if s.id not in seg_ids]


def first_pixels(mask: np.ndarray, n: int) -> np.ndarray:
    """The first `n` pixels of `mask` in raster order, as a mask."""
    flat = np.zeros(mask.size, dtype=bool)
    flat[np.flatnonzero(mask)[:n]] = True
    return flat.reshape(mask.shape)


def shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) pixels, what leaves the image dropped."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    inside = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
    out = np.zeros_like(mask)
    out[ys[inside], xs[inside]] = True
    return out


# Perturbations of the ground truth: each returns the prediction (id map, segments).
Case = Callable[[Sample], tuple[np.ndarray, list[PanopticSegment]]]


def identity(s: Sample):
    return s.ids.copy(), list(s.segments)


def identity_crowd_unlabeled(s: Sample):
    pred = s.ids.copy()
    pred[np.isin(pred, [PERSON_CROWD, HORSE_CROWD])] = 0
    return pred, without(s.segments, PERSON_CROWD, HORSE_CROWD)


def drop_person(s: Sample):
    pred = s.ids.copy()
    pred[pred == PERSON_A] = 0
    return pred, without(s.segments, PERSON_A)


def truck_as_horse(s: Sample):
    return s.ids.copy(), [replace(x, category_id=HORSE) if x.id == TRUCK_SMALL else x for x in s.segments]


def shift_case(seg_id: int, dy: int, dx: int) -> Case:
    def case(s: Sample):
        pred = s.ids.copy()
        pred[pred == seg_id] = 0
        pred[shifted(s.ids == seg_id, dy, dx)] = seg_id  # drawn over whatever was there
        present = set(np.unique(pred).tolist())
        return pred, [x for x in s.segments if x.id in present]

    return case


def void_segment(extra_grass: int) -> Case:
    """A new truck segment on all VOID pixels plus the first `extra_grass` grass pixels."""

    def case(s: Sample):
        pred = s.ids.copy()
        pred[(s.ids == 0) | first_pixels(s.ids == GRASS, extra_grass)] = NEW_ID
        return pred, [*s.segments, PanopticSegment(id=NEW_ID, category_id=TRUCK)]

    return case


def crowd_as_horse(s: Sample):
    """The person crowd region predicted as a horse (not crowd)."""
    segments = [replace(x, category_id=HORSE, iscrowd=False) if x.id == PERSON_CROWD else x for x in s.segments]
    return s.ids.copy(), segments


def crowd_void_segment(extra_grass: int) -> Case:
    """The person crowd region grown over all VOID pixels and the first `extra_grass` grass pixels."""

    def case(s: Sample):
        pred = s.ids.copy()
        pred[(s.ids == 0) | first_pixels(s.ids == GRASS, extra_grass)] = PERSON_CROWD
        return pred, list(s.segments)

    return case


def merge_case(*seg_ids: int) -> Case:
    def case(s: Sample):
        pred = s.ids.copy()
        pred[np.isin(pred, seg_ids)] = seg_ids[0]
        return pred, without(s.segments, *seg_ids[1:])

    return case


CASES: dict[str, Case] = {
    "identity": identity,
    "identity_crowd_unlabeled": identity_crowd_unlabeled,
    "drop_person": drop_person,
    "truck_as_horse": truck_as_horse,
    "shift_sky_down_15": shift_case(SKY, 15, 0),
    "shift_sky_down_16": shift_case(SKY, 16, 0),
    "shift_person_right_8": shift_case(PERSON_A, 0, 8),
    "shift_person_right_9": shift_case(PERSON_A, 0, 9),
    "void_segment_7188": void_segment(7188),
    "void_segment_7189": void_segment(7189),
    "crowd_as_horse": crowd_as_horse,
    "crowd_void_segment_15027": crowd_void_segment(15027),
    "crowd_void_segment_15028": crowd_void_segment(15028),
    "merge_two_persons": merge_case(PERSON_A, PERSON_B),
    "merge_three_persons": merge_case(PERSON_A, PERSON_C, PERSON_B),
}


# ----------------------------------------------------------------------------- independent reference


def reference_counts(
    gt_ids: np.ndarray, gt_segments: list[PanopticSegment], pred_ids: np.ndarray, pred_segments: list[PanopticSegment]
) -> dict[int, dict]:
    """panopticapi's per-category TP / FP / FN / IoUs for one image, computed the slow, obvious way."""
    void = gt_ids == 0
    gt_mask = {g.id: gt_ids == g.id for g in gt_segments}
    pred_mask = {p.id: pred_ids == p.id for p in pred_segments}
    counts: dict[int, dict] = {}

    def of(category_id: int) -> dict:
        return counts.setdefault(category_id, {"tp": 0, "fp": 0, "fn": 0, "ious": []})

    matched: set[int] = set()
    for g in gt_segments:
        if g.iscrowd:
            continue
        for p in pred_segments:
            if p.category_id != g.category_id:
                continue
            inter = np.count_nonzero(gt_mask[g.id] & pred_mask[p.id])
            # |G ∪ P| minus the predicted pixels on VOID = pred + gt - inter - (pred ∩ VOID)
            union = np.count_nonzero(gt_mask[g.id] | pred_mask[p.id]) - np.count_nonzero(pred_mask[p.id] & void)
            if inter / union > 0.5:
                of(g.category_id)["tp"] += 1
                of(g.category_id)["ious"].append(inter / union)
                matched |= {("gt", g.id), ("pred", p.id)}
        if ("gt", g.id) not in matched:
            of(g.category_id)["fn"] += 1
    crowd = {g.category_id: gt_mask[g.id] for g in gt_segments if g.iscrowd}  # the last one listed wins
    for p in pred_segments:
        if ("pred", p.id) in matched:
            continue
        ignored = np.count_nonzero(pred_mask[p.id] & void)
        if p.category_id in crowd:
            ignored += np.count_nonzero(pred_mask[p.id] & crowd[p.category_id])
        if not ignored / np.count_nonzero(pred_mask[p.id]) > 0.5:
            of(p.category_id)["fp"] += 1
    return counts


def add_counts(total: dict[int, dict], counts: dict[int, dict]) -> None:
    for cat, c in counts.items():
        t = total.setdefault(cat, {"tp": 0, "fp": 0, "fn": 0, "ious": []})
        t["tp"] += c["tp"]
        t["fp"] += c["fp"]
        t["fn"] += c["fn"]
        t["ious"] += c["ious"]


def reference_summary(counts: dict[int, dict], categories: list[dict]) -> dict:
    """`PQStat.pq_average` for All / Things / Stuff plus the per-class table, in percent."""
    per_class = {}
    for cat in categories:
        c = counts.get(cat["id"])
        if c is None or c["tp"] + c["fp"] + c["fn"] == 0:
            continue
        iou, tp = math.fsum(c["ious"]), c["tp"]
        denominator = tp + 0.5 * c["fp"] + 0.5 * c["fn"]
        per_class[cat["name"]] = {
            "PQ": 100 * (iou / denominator),
            "SQ": 100 * (iou / tp if tp else 0.0),
            "RQ": 100 * (tp / denominator),
            "tp": tp,
            "fp": c["fp"],
            "fn": c["fn"],
            "isthing": bool(cat["isthing"]),
        }
    result = {}
    for suffix, keep in (("", lambda t: True), ("_th", lambda t: t), ("_st", lambda t: not t)):
        group = [v for v in per_class.values() if keep(v["isthing"])]
        for key in ("PQ", "SQ", "RQ"):
            result[key + suffix] = 100 * (sum(v[key] / 100 for v in group) / len(group)) if group else 0.0
        result["n" + suffix] = len(group)
    return {"result": result, "per_class": {k: {m: v[m] for m in v if m != "isthing"} for k, v in per_class.items()}}


def score(sample: Sample, pred_ids: np.ndarray, pred_segments: list[PanopticSegment]) -> PanopticMetrics:
    metrics = PanopticMetrics(sample.categories)
    metrics.add("000000439180.png", sample.ids, sample.segments, pred_ids, pred_segments)
    return metrics


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_close(actual[key], value)
        else:
            assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def row(pq: float, sq: float, rq: float, *, tp: int, fp: int, fn: int) -> dict[str, float]:
    """One per_class() row."""
    return {"PQ": pq, "SQ": sq, "RQ": rq, "tp": tp, "fp": fp, "fn": fn}


def perfect_except(metrics: PanopticMetrics) -> dict[str, dict]:
    """per_class() rows that are not a perfect 100 / 100 / 100 with no FP or FN."""
    return {
        name: row
        for name, row in metrics.per_class().items()
        if not (row["PQ"] == row["SQ"] == row["RQ"] == 100.0 and row["fp"] == row["fn"] == 0)
    }


# ------------------------------------------------------------------------------------------ id maps


def test_rgb_ids_round_trip_on_the_real_png(sample: Sample) -> None:
    png = np.array(Image.open(ANNOTATIONS / "panoptic_val2017" / "000000439180.png"))
    ids = rgb_to_id(png)
    assert ids.shape == (360, 640) and ids.dtype == np.int64
    assert set(np.unique(ids).tolist()) == {s.id for s in sample.segments} | {0}
    np.testing.assert_array_equal(id_to_rgb(ids), png)
    # one pixel by hand: 3937500 = 220 + 256 * 20 + 65536 * 60
    assert rgb_to_id(np.array([[[220, 20, 60]]], dtype=np.uint8))[0, 0] == 3937500
    np.testing.assert_array_equal(id_to_rgb(np.array([3937500])), [[220, 20, 60]])


def test_id_maps_are_checked() -> None:
    with pytest.raises(ValueError, match="0..16777215"):
        id_to_rgb(np.array([256**3]))
    with pytest.raises(ValueError, match="H x W x 3"):
        rgb_to_id(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        rgb_to_id(np.full((1, 1, 3), 256))


# ------------------------------------------------------------------------------------- real sample


@pytest.mark.parametrize("case", ["identity", "identity_crowd_unlabeled"])
def test_ground_truth_against_itself_is_perfect(sample: Sample, case: str) -> None:
    metrics = score(sample, *CASES[case](sample))
    per_class = metrics.per_class()
    # 7 categories count; the crowd segments count nowhere (no FN, and as predictions they lie wholly
    # on their own category's crowd region, so no FP either).
    assert list(per_class) == ["person", "truck", "horse", "gravel", "tree-merged", "sky-other-merged", "grass-merged"]
    assert per_class["person"]["tp"] == 13 and per_class["horse"]["tp"] == 11 and per_class["truck"]["tp"] == 2
    assert perfect_except(metrics) == {}
    assert metrics.result() == {
        "PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "n": 7,
        "PQ_th": 100.0, "SQ_th": 100.0, "RQ_th": 100.0, "n_th": 3,
        "PQ_st": 100.0, "SQ_st": 100.0, "RQ_st": 100.0, "n_st": 4,
    }  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_perturbation_matches_reference_and_golden(
    sample: Sample, perturbed: dict[str, Perturbed], golden: dict, case: str
) -> None:
    p = perturbed[case]
    metrics = score(sample, p.pred_ids, p.pred_segments)
    expected = reference_summary(p.reference, sample.categories)
    assert_close(metrics.result(), expected["result"])
    assert_close(metrics.per_class(), expected["per_class"])
    committed = golden["cases"][case]
    assert_close(expected["result"], committed["result"])
    assert_close(expected["per_class"], committed["per_class"])


def test_golden_file_names_its_provenance(golden: dict) -> None:
    assert PANOPTICAPI_COMMIT in golden["provenance"]
    assert set(golden["cases"]) == set(CASES)
    assert all(c["perturbation"] and c["derivation"] for c in golden["cases"].values())


def test_dropped_person_is_one_false_negative(sample: Sample) -> None:
    metrics = score(sample, *drop_person(sample))
    # person: 12 of 13 non-crowd persons matched with IoU 1, one FN -> PQ = 12 / (12 + 0.5) = 96 %.
    assert perfect_except(metrics) == {"person": {"PQ": 96.0, "SQ": 100.0, "RQ": 96.0, "tp": 12, "fp": 0, "fn": 1}}
    result = metrics.result()
    assert result["PQ"] == pytest.approx((96 + 6 * 100) / 7)
    assert result["PQ_th"] == pytest.approx((96 + 100 + 100) / 3)
    assert result["PQ_st"] == 100.0


def test_swapped_category_is_a_false_negative_and_a_false_positive(sample: Sample) -> None:
    metrics = score(sample, *truck_as_horse(sample))
    # truck: 1 of 2 matched, the other FN -> 1 / 1.5; horse: 11 matched plus the truck as an FP -> 11 / 11.5.
    # The "horse" lies on truck pixels: no VOID, no horse crowd under it, so it is an FP.
    assert_close(
        perfect_except(metrics),
        {
            "truck": {"PQ": 100 / 1.5, "SQ": 100.0, "RQ": 100 / 1.5, "tp": 1, "fp": 0, "fn": 1},
            "horse": {"PQ": 1100 / 11.5, "SQ": 100.0, "RQ": 1100 / 11.5, "tp": 11, "fp": 1, "fn": 0},
        },
    )
    assert metrics.result()["PQ_th"] == pytest.approx((100 + 100 / 1.5 + 1100 / 11.5) / 3)


def independent_iou(gt: np.ndarray, pred: np.ndarray, void: np.ndarray) -> float:
    inter = np.count_nonzero(gt & pred)
    return inter / (np.count_nonzero(pred) + np.count_nonzero(gt) - inter - np.count_nonzero(pred & void))


@pytest.mark.parametrize("k, matched", [(15, True), (16, False)])
def test_shifted_sky_scores_its_iou(sample: Sample, k: int, matched: bool) -> None:
    pred_ids, pred_segments = shift_case(SKY, k, 0)(sample)
    sky_gt, sky_pred, void = sample.ids == SKY, pred_ids == SKY, sample.ids == 0
    # Moving the sky down only covers sky, tree and VOID pixels, so only those two categories change.
    assert set(np.unique(sample.ids[sky_pred]).tolist()) <= {SKY, TREE, 0}
    iou = independent_iou(sky_gt, sky_pred, void)  # k=15: 8751 / 17073 = 0.5126; k=16: 8553 / 17271 = 0.4952
    assert bool(iou > 0.5) is matched
    metrics = score(sample, pred_ids, pred_segments)
    rows = perfect_except(metrics)
    assert set(rows) == {"sky-other-merged", "tree-merged"}
    if matched:  # one TP: PQ = SQ = IoU, RQ = 1
        assert_close(rows["sky-other-merged"], row(100 * iou, 100 * iou, 100.0, tp=1, fp=0, fn=0))
    else:  # the gt sky is an FN, the shifted sky an FP (it lies on no VOID): PQ = SQ = RQ = 0
        assert_close(rows["sky-other-merged"], {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "tp": 0, "fp": 1, "fn": 1})
    # The tree lost the pixels the sky moved onto; its prediction lies inside its ground truth and on
    # no VOID, so union = gt area and IoU = predicted tree area / gt tree area.
    tree_iou = np.count_nonzero(pred_ids == TREE) / np.count_nonzero(sample.ids == TREE)
    assert_close(rows["tree-merged"], row(100 * tree_iou, 100 * tree_iou, 100.0, tp=1, fp=0, fn=0))


def test_shift_to_an_iou_of_exactly_one_half_is_no_match(sample: Sample) -> None:
    void = sample.ids == 0
    person_gt = sample.ids == PERSON_A
    ious = {}
    for k in (8, 9):
        pred_ids, pred_segments = shift_case(PERSON_A, 0, k)(sample)
        person_pred = pred_ids == PERSON_A
        assert np.count_nonzero(person_pred) == 3512  # the whole person moved, nothing clipped
        ious[k] = independent_iou(person_gt, person_pred, void)
        per_class = score(sample, pred_ids, pred_segments).per_class()
        others = reference_summary(
            reference_counts(
                sample.ids, without(sample.segments, PERSON_A), pred_ids, without(pred_segments, PERSON_A)
            ),
            sample.categories,
        )["per_class"]["person"]
        if k == 8:  # matched: one more TP with this IoU than the other persons alone give
            assert per_class["person"]["tp"] == others["tp"] + 1
            assert per_class["person"]["fn"] == others["fn"] and per_class["person"]["fp"] == others["fp"]
        else:  # not matched: one more FN, and one more FP (268 of its 3512 pixels lie on VOID)
            assert per_class["person"]["tp"] == others["tp"]
            assert per_class["person"]["fn"] == others["fn"] + 1 and per_class["person"]["fp"] == others["fp"] + 1
    # k=8: 2392 / (3512 + 3512 - 2392 - 255 VOID) = 2392 / 4377; k=9: 2252 / (7024 - 2252 - 268) = 2252 / 4504
    assert ious == {8: 2392 / 4377, 9: 0.5}


@pytest.mark.parametrize("extra, is_fp", [(7188, False), (7189, True)])
def test_segment_mostly_on_void_is_not_a_false_positive(sample: Sample, extra: int, is_fp: bool) -> None:
    metrics = score(sample, *void_segment(extra)(sample))
    # A new truck on the 7189 VOID pixels plus `extra` grass pixels: 7189 / (7189 + 7188) > 0.5 is
    # ignored, 7189 / (7189 + 7189) = 0.5 exactly is an FP (panopticapi ignores only "> 0.5").
    rows = perfect_except(metrics)
    # grass keeps 40197 - extra of its pixels, all inside its gt: IoU = (40197 - extra) / 40197
    grass = 100 * (40197 - extra) / 40197
    expected = {"grass-merged": {"PQ": grass, "SQ": grass, "RQ": 100.0, "tp": 1, "fp": 0, "fn": 0}}
    if is_fp:  # truck: 2 TP, 1 FP -> PQ = RQ = 2 / 2.5
        expected["truck"] = {"PQ": 80.0, "SQ": 100.0, "RQ": 80.0, "tp": 2, "fp": 1, "fn": 0}
    assert_close(rows, expected)


def test_crowd_region_excuses_only_its_own_category(sample: Sample) -> None:
    # The person crowd region (7839 px) predicted as a horse: the horse crowd does not cover it -> FP.
    rows = perfect_except(score(sample, *crowd_as_horse(sample)))
    assert_close(rows, {"horse": {"PQ": 1100 / 11.5, "SQ": 100.0, "RQ": 1100 / 11.5, "tp": 11, "fp": 1, "fn": 0}})


@pytest.mark.parametrize("extra, is_fp", [(15027, False), (15028, True)])
def test_void_and_crowd_together_excuse_a_prediction(sample: Sample, extra: int, is_fp: bool) -> None:
    # The predicted person crowd grown over VOID (7189) and `extra` grass pixels: neither VOID nor the
    # crowd alone is half of it, together (7189 + 7839) / (15028 + extra) is > 0.5 for 15027, = 0.5 for 15028.
    rows = perfect_except(score(sample, *crowd_void_segment(extra)(sample)))
    grass = 100 * (40197 - extra) / 40197
    expected = {"grass-merged": {"PQ": grass, "SQ": grass, "RQ": 100.0, "tp": 1, "fp": 0, "fn": 0}}
    if is_fp:  # person: 13 TP, 1 FP -> 13 / 13.5
        expected["person"] = {"PQ": 1300 / 13.5, "SQ": 100.0, "RQ": 1300 / 13.5, "tp": 13, "fp": 1, "fn": 0}
    assert_close(rows, expected)


def test_merged_persons(sample: Sample) -> None:
    # Two persons (3512 + 2493 px) as one prediction: IoU with the larger = 3512 / 6005 > 0.5 -> TP,
    # the smaller is an FN. person: 12 TP with IoU sum 11 + 3512/6005, 1 FN.
    rows = perfect_except(score(sample, *merge_case(PERSON_A, PERSON_B)(sample)))
    iou_sum = 11 + 3512 / 6005
    assert_close(
        rows,
        {"person": row(100 * iou_sum / 12.5, 100 * iou_sum / 12, 1200 / 12.5, tp=12, fp=0, fn=1)},
    )
    # Three persons (3512 + 2955 + 2493 = 8960 px): the best IoU is 3512 / 8960 < 0.5 -> 3 FN and 1 FP.
    rows = perfect_except(score(sample, *merge_case(PERSON_A, PERSON_C, PERSON_B)(sample)))
    assert_close(rows, {"person": {"PQ": 1000 / 12, "SQ": 100.0, "RQ": 1000 / 12, "tp": 10, "fp": 1, "fn": 3}})


def test_merge_of_two_halves_equals_one_accumulator(sample: Sample, perturbed: dict[str, Perturbed]) -> None:
    # The 15 perturbations as 15 images.
    names = list(perturbed)
    whole = PanopticMetrics(sample.categories)
    halves = [PanopticMetrics(sample.categories), PanopticMetrics(sample.categories)]
    total: dict[int, dict] = {}
    for i, name in enumerate(names):
        p = perturbed[name]
        whole.add(name, sample.ids, sample.segments, p.pred_ids, p.pred_segments)
        halves[i % 2].add(name, sample.ids, sample.segments, p.pred_ids, p.pred_segments)
        add_counts(total, p.reference)
    halves[1].merge(halves[0])  # the other order on purpose: the result must not depend on it
    assert halves[1].num_images == whole.num_images == len(names)
    assert halves[1].result() == whole.result()
    assert halves[1].per_class() == whole.per_class()
    # Counts are summed over images before the ratios, as panopticapi's PQStat does.
    expected = reference_summary(total, sample.categories)
    assert_close(whole.result(), expected["result"])
    assert_close(whole.per_class(), expected["per_class"])


# ------------------------------------------------------------------------------------ 4 x 4 by hand

TINY_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": True},
    {"id": 3, "name": "grass", "isthing": 0},
]


def seg(seg_id: int, category_id: int, iscrowd: bool = False) -> PanopticSegment:
    return PanopticSegment(id=seg_id, category_id=category_id, iscrowd=iscrowd)


def tiny(gt, gt_segments, pred, pred_segments, image: str = "tiny") -> PanopticMetrics:
    metrics = PanopticMetrics(TINY_CATEGORIES)
    metrics.add(image, np.array(gt), gt_segments, np.array(pred), pred_segments)
    return metrics


def test_tiny_void_pixels_do_not_enlarge_the_union() -> None:
    # gt: person 1 on the left 8 pixels, VOID on the right 8; the prediction covers all 16.
    # union = 16 + 8 - 8 - 8 (pred on VOID) = 8, IoU = 8 / 8 = 1 (without the VOID term: 0.5, no match).
    m = tiny([[1, 1, 0, 0]] * 4, [seg(1, 1)], [[5, 5, 5, 5]] * 4, [seg(5, 1)])
    assert m.per_class() == {"person": {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "tp": 1, "fp": 0, "fn": 0}}


def test_tiny_iou_of_exactly_one_half_is_no_match() -> None:
    # gt: person 1 left half (8 px), grass 2 right half (8 px). pred: person 5 on all 16 pixels, no grass.
    # IoU(1, 5) = 8 / (16 + 8 - 8 - 0) = 0.5, not > 0.5: person FN + FP; grass FN.
    m = tiny([[1, 1, 2, 2]] * 4, [seg(1, 1), seg(2, 3)], [[5, 5, 5, 5]] * 4, [seg(5, 1)])
    assert m.per_class() == {
        "person": {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "tp": 0, "fp": 1, "fn": 1},
        "grass": {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "tp": 0, "fp": 0, "fn": 1},
    }
    # A thing-and-stuff image where nothing matched: every mean is 0 over 2 counted categories.
    assert m.result() == {
        "PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "n": 2,
        "PQ_th": 0.0, "SQ_th": 0.0, "RQ_th": 0.0, "n_th": 1,
        "PQ_st": 0.0, "SQ_st": 0.0, "RQ_st": 0.0, "n_st": 1,
    }  # fmt: skip


def test_tiny_crowd_is_never_matched_and_excuses_its_category() -> None:
    gt = [[1, 1, 2, 2]] * 4  # person crowd 1 (8 px), grass 2 (8 px)
    # pred: person 3 = the crowd plus column 2 of rows 0-2 (11 px); grass 4 = the 5 remaining pixels.
    pred = [[3, 3, 3, 4], [3, 3, 3, 4], [3, 3, 3, 4], [3, 3, 4, 4]]
    m = tiny(gt, [seg(1, 1, iscrowd=True), seg(2, 3)], pred, [seg(3, 1), seg(4, 3)])
    # person 3: crowd never matches; 8 of its 11 px lie on the person crowd, 8/11 > 0.5 -> not an FP,
    # and the crowd is no FN: person is not counted at all.
    # grass: IoU(2, 4) = 5 / (5 + 8 - 5) = 5/8 -> TP: PQ = SQ = 62.5, RQ = 100.
    assert m.per_class() == {"grass": {"PQ": 62.5, "SQ": 62.5, "RQ": 100.0, "tp": 1, "fp": 0, "fn": 0}}
    # Only stuff counted: Things has no category and reports 0.0 (panopticapi would divide 0 by 0).
    assert m.result() == {
        "PQ": 62.5, "SQ": 62.5, "RQ": 100.0, "n": 1,
        "PQ_th": 0.0, "SQ_th": 0.0, "RQ_th": 0.0, "n_th": 0,
        "PQ_st": 62.5, "SQ_st": 62.5, "RQ_st": 100.0, "n_st": 1,
    }  # fmt: skip
    # The same pixels predicted as a car: the person crowd does not excuse a car -> car FP.
    m = tiny(gt, [seg(1, 1, iscrowd=True), seg(2, 3)], pred, [seg(3, 2), seg(4, 3)])
    assert m.per_class()["car"] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "tp": 0, "fp": 1, "fn": 0}


def test_tiny_last_crowd_segment_of_a_category_wins() -> None:
    # Two person crowds: 1 on rows 0-1, 2 on rows 2-3. The prediction (person 7) covers rows 0-1.
    # panopticapi keeps one crowd region per category, the last listed: with [1, 2] that is crowd 2,
    # which person 7 does not touch (0/8) -> FP; with [2, 1] it is crowd 1 (8/8) -> ignored.
    gt = [[1] * 4, [1] * 4, [2] * 4, [2] * 4]
    pred = [[7] * 4, [7] * 4, [0] * 4, [0] * 4]
    m = tiny(gt, [seg(1, 1, iscrowd=True), seg(2, 1, iscrowd=True)], pred, [seg(7, 1)])
    assert m.per_class() == {"person": {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "tp": 0, "fp": 1, "fn": 0}}
    m = tiny(gt, [seg(2, 1, iscrowd=True), seg(1, 1, iscrowd=True)], pred, [seg(7, 1)])
    assert m.per_class() == {}
    assert m.result()["n"] == 0 and m.result()["PQ"] == 0.0


def test_tiny_predicted_iscrowd_is_ignored() -> None:
    # Only ground-truth crowds are special: a prediction flagged iscrowd is scored like any other.
    gt = [[1, 0, 0, 0]] * 4  # person 1: column 0 (4 px), the rest VOID
    pred = [[5, 5, 3, 3]] * 4  # person 5 (flagged crowd): columns 0-1 (8 px, 4 on VOID); grass 3: columns 2-3
    m = tiny(gt, [seg(1, 1)], pred, [seg(5, 1, iscrowd=True), seg(3, 3)])
    # IoU(1, 5) = 4 / (8 + 4 - 4 - 4 on VOID) = 1 -> TP. grass 3: all 8 px on VOID -> not an FP.
    assert m.per_class() == {"person": {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "tp": 1, "fp": 0, "fn": 0}}


def test_tiny_counts_are_summed_over_images_before_the_ratios() -> None:
    m = PanopticMetrics(TINY_CATEGORIES)
    # image a: person 1 is 4 px (column 0), prediction 3 px of it -> IoU 3/4 -> TP.
    m.add("a", np.array([[1, 2, 2, 2]] * 4), [seg(1, 1), seg(2, 3)],
          np.array([[5, 6, 6, 6]] * 3 + [[6, 6, 6, 6]]), [seg(5, 1), seg(6, 3)])  # fmt: skip
    # image b: the person is not predicted -> FN; grass is perfect.
    m.add("b", np.array([[1, 2, 2, 2]] * 4), [seg(1, 1), seg(2, 3)], np.array([[0, 6, 6, 6]] * 4), [seg(6, 3)])
    # person: TP 1 (IoU 0.75), FN 1 -> PQ = 0.75 / 1.5 = 50 %, SQ = 75 %, RQ = 1 / 1.5; not the mean of the
    # per-image PQs (75 and 0). grass image a: IoU(2, 6) = 12 / (13 + 12 - 12) = 12/13; image b: 1.
    assert_close(
        m.per_class(),
        {
            "person": {"PQ": 50.0, "SQ": 75.0, "RQ": 100 / 1.5, "tp": 1, "fp": 0, "fn": 1},
            "grass": {"PQ": 50 * (12 / 13 + 1), "SQ": 50 * (12 / 13 + 1), "RQ": 100.0, "tp": 2, "fp": 0, "fn": 0},
        },
    )
    assert_close(
        m.result(),
        {
            "PQ": (50.0 + 50 * (12 / 13 + 1)) / 2, "SQ": (75.0 + 50 * (12 / 13 + 1)) / 2,
            "RQ": (100 / 1.5 + 100) / 2, "n": 2,
            "PQ_th": 50.0, "SQ_th": 75.0, "RQ_th": 100 / 1.5, "n_th": 1,
            "PQ_st": 50 * (12 / 13 + 1), "SQ_st": 50 * (12 / 13 + 1), "RQ_st": 100.0, "n_st": 1,
        },
    )  # fmt: skip


def test_tiny_ids_beyond_the_png_range_work() -> None:
    # Ids are only labels: 2^31 + 1 and 2^32 - 1 (beyond 24-bit PNG ids) score like 1 and 5.
    big, top = 2**31 + 1, 2**32 - 1
    m = tiny([[1, 1, 0, 0]] * 4, [seg(1, 1)], np.array([[top, top, top, 0]] * 4, dtype=np.uint32), [seg(top, 1)])
    n = tiny(np.array([[big, big, 0, 0]] * 4), [seg(big, 1)], [[5, 5, 5, 0]] * 4, [seg(5, 1)])
    # IoU = 8 / (12 + 8 - 8 - 4 on VOID) = 1
    assert m.per_class() == n.per_class() == {"person": row(100.0, 100.0, 100.0, tp=1, fp=0, fn=0)}
    with pytest.raises(ValueError, match=r"'tiny'.*gt_ids holds segment id -1"):
        tiny([[-1, 1, 1, 1]] * 4, [seg(1, 1)], [[1, 1, 1, 1]] * 4, [seg(1, 1)])
    with pytest.raises(ValueError, match=r"'tiny'.*pred_ids holds segment id 4294967296"):
        tiny([[1, 1, 1, 1]] * 4, [seg(1, 1)], [[2**32] * 4] * 4, [seg(2**32, 1)])


# --------------------------------------------------------------------------------------------- errors


def test_errors_name_the_image_and_the_segment(sample: Sample) -> None:
    m = PanopticMetrics(sample.categories)
    gt, segs = sample.ids, sample.segments
    with pytest.raises(ValueError, match=rf"'img-1'.*segment id {SKY} is in pred_ids but not in pred_segments"):
        m.add("img-1", gt, segs, gt, without(segs, SKY))
    pred = gt.copy()
    pred[pred == SKY] = 0
    with pytest.raises(ValueError, match=rf"'img-2'.*pred_segments ids \[{SKY}\] have no pixel in pred_ids"):
        m.add("img-2", gt, segs, pred, segs)
    unknown = [replace(s, category_id=999) if s.id == SKY else s for s in segs]
    with pytest.raises(ValueError, match=rf"'img-3'.*segment id {SKY} in pred_segments has unknown category_id 999"):
        m.add("img-3", gt, segs, gt, unknown)
    with pytest.raises(ValueError, match=rf"'img-4'.*segment id {SKY} in gt_segments has unknown category_id 999"):
        m.add("img-4", gt, unknown, gt, segs)
    with pytest.raises(ValueError, match=rf"'img-5'.*segment id {SKY} is in gt_ids but not in gt_segments"):
        m.add("img-5", gt, without(segs, SKY), gt, segs)
    with pytest.raises(ValueError, match=r"'img-6'.*gt_ids has shape \(360, 640\) but pred_ids \(360, 639\)"):
        m.add("img-6", gt, segs, gt[:, :-1], segs)
    with pytest.raises(ValueError, match=rf"'img-7'.*lists segment id {SKY} twice"):
        m.add("img-7", gt, segs, gt, [*segs, seg(SKY, 1)])
    with pytest.raises(ValueError, match=r"'img-8'.*segment id 0, which is reserved for VOID"):
        m.add("img-8", gt, segs, gt, [*segs, seg(0, 1)])
    with pytest.raises(ValueError, match=r"'img-9'.*pred_ids must be an H x W segment-id map"):
        m.add("img-9", gt, segs, id_to_rgb(gt), segs)
    with pytest.raises(ValueError, match=r"'img-10'.*pred_ids must hold integer segment ids"):
        m.add("img-10", gt, segs, gt.astype(np.float32), segs)
    assert m.num_images == 0 and m.result()["n"] == 0  # nothing was accumulated by a failed add
    m.add("img-1", gt, segs, gt, segs)
    with pytest.raises(ValueError, match=r"image 'img-1' was already added"):
        m.add("img-1", gt, segs, gt, segs)


def test_merge_and_categories_are_checked(sample: Sample) -> None:
    a, b = PanopticMetrics(sample.categories), PanopticMetrics(sample.categories)
    a.add("x", sample.ids, sample.segments, sample.ids, sample.segments)
    b.add("x", sample.ids, sample.segments, sample.ids, sample.segments)
    with pytest.raises(ValueError, match=r"images \['x'\] were scored in both"):
        a.merge(b)
    with pytest.raises(ValueError, match="different categories"):
        a.merge(PanopticMetrics(TINY_CATEGORIES))
    with pytest.raises(ValueError, match="category id 1 is listed twice"):
        PanopticMetrics([*TINY_CATEGORIES, {"id": 1, "name": "other", "isthing": 0}])
    with pytest.raises(ValueError, match="category name 'car' is listed twice"):
        PanopticMetrics([*TINY_CATEGORIES, {"id": 9, "name": "car", "isthing": 0}])
    with pytest.raises(ValueError, match="lacks isthing"):
        PanopticMetrics([{"id": 1, "name": "person"}])
    with pytest.raises(ValueError, match="isthing must be a bool or 0/1"):
        PanopticMetrics([{"id": 1, "name": "person", "isthing": "yes"}])
