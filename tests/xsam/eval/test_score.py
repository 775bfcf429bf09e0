"""Scoring prediction files against the ground truth in our shards (`xsam eval score`).

The metrics themselves are checked against their references in test_{panoptic,semantic,coco,referring,gcg}.py;
here: ground truth written out in each prediction format scores perfectly through the whole path (shards ->
ground-truth view -> prediction file -> metric), a known perturbation gives the value computed by hand, and bad
prediction files are refused with errors that name the entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import invoke_cli, run_cli
from xsam.data import masks as mask_codec
from xsam.eval.groundtruth import GroundTruthError, View, load_ground_truth, record_image_key
from xsam.eval.panoptic import id_to_rgb
from xsam.eval.predictions import PredictionError
from xsam.eval.score import score


def _rle(mask: np.ndarray) -> dict:
    rle = mask_codec.encode(mask)
    return {"size": list(rle.size), "counts": rle.counts}


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _referring_truth(task: str, dataset: Path, split: str | None = None, view: View | None = None) -> list[dict]:
    gt = load_ground_truth(task, dataset, split=split, view=view)
    return [{"key": s.key, "segmentation": _rle(s.gt_mask()) if s.targets else None} for s in gt.referring_samples()]


@pytest.mark.parametrize("task, name, split", [
    ("refseg", "refcoco", "val"), ("refseg", "refcoco", "testA"), ("grefseg", "grefcoco", None),
    ("intseg", "coco-interactive", None),
])
def test_referring_ground_truth_scores_perfectly(eval_world, tmp_path, task, name, split):
    pred = _write(tmp_path / "masks.json", _referring_truth(task, eval_world[name], split))
    report = score(task, eval_world[name], pred, split=split)
    assert report.missing == []
    assert report.scores["cIoU"] == pytest.approx(100.0) and report.scores["gIoU"] == pytest.approx(100.0)
    if task == "grefseg":  # the sample holds no-target expressions: predicted empty, they are all right
        assert report.scores["N-acc"] == pytest.approx(100.0) and report.scores["T-acc"] == pytest.approx(100.0)
    if task == "intseg":
        assert report.scores["mIoU"] == report.scores["gIoU"] and report.scores["point/mIoU"] == pytest.approx(100.0)


def test_referring_perturbation_matches_hand_computation(eval_world, tmp_path):
    """One item predicted empty, one given another object's mask: cIoU = ΣI / ΣU by hand."""
    gt = load_ground_truth("refseg", eval_world["refcoco"], split="val")
    samples = list(gt.referring_samples())
    masks = [s.gt_mask() for s in samples]
    entries = [{"key": s.key, "segmentation": _rle(m)} for s, m in zip(samples, masks)]
    entries[0]["segmentation"] = None
    other = next(m for m in masks if not np.array_equal(m, masks[1]))
    entries[1]["segmentation"] = _rle(other)
    report = score("refseg", eval_world["refcoco"], _write(tmp_path / "p.json", entries), split="val")
    inter = [0, int((other & masks[1]).sum())] + [int(m.sum()) for m in masks[2:]]
    union = [int(masks[0].sum()), int((other | masks[1]).sum())] + [int(m.sum()) for m in masks[2:]]
    assert report.scores["cIoU"] == pytest.approx(100 * sum(inter) / sum(union))
    assert report.scores["gIoU"] == pytest.approx(100 * np.mean([i / u for i, u in zip(inter, union)]))
    assert report.per_sample[samples[0].key] == 0.0


def test_upstream_sentence_ids_name_refcoco_items(eval_world, tmp_path):
    """The official X-SAM keys its outputs by image id and sentence id: accepted instead of item keys."""
    gt = load_ground_truth("refseg", eval_world["refcoco"], split="val")
    entries = []
    for s in gt.referring_samples():
        image, sent = s.aliases[0].split("/")
        entries.append({"image_id": int(image), "sent_id": int(sent), "segmentation": _rle(s.gt_mask())})
    report = score("refseg", eval_world["refcoco"], _write(tmp_path / "p.json", entries), split="val")
    assert report.scores["cIoU"] == pytest.approx(100.0) and not report.missing


def test_prompt_kind_view_renders_each_kind(eval_world, tmp_path):
    dataset = eval_world["coco-interactive"]
    for kind in ("point", "box"):
        view = View(prompt_kind=kind)
        gt = load_ground_truth("intseg", dataset, view=view)
        kinds = {s.group for s in gt.referring_samples()}
        assert kinds == {kind}
        pred = _write(tmp_path / f"{kind}.json", _referring_truth("intseg", dataset, view=view))
        assert score("intseg", dataset, pred, view=view).scores[f"{kind}/cIoU"] == pytest.approx(100.0)


def _coco_truth(gt) -> list[dict]:
    ids = {i + 1: record_image_key(r) for i, r in enumerate(gt.records)}
    return [{"image_id": ids[a["image_id"]], "category_id": a["category_id"], "segmentation": a["segmentation"],
             "score": 1.0} for a in gt.coco_annotations() if not a["iscrowd"]]


@pytest.mark.parametrize("task, name", [("genseg-instance", "coco-panoptic"), ("genseg-instance", "coco-instances"),
                                        ("vgdseg", "coco-vgd")])
def test_instance_ground_truth_scores_perfectly(eval_world, tmp_path, task, name):
    gt = load_ground_truth(task, eval_world[name])
    report = score(task, eval_world[name], _write(tmp_path / "inst.json", _coco_truth(gt)))
    assert report.scores["AP"] == pytest.approx(100.0) and report.scores["AP50"] == pytest.approx(100.0)
    assert report.per_class and all(v == pytest.approx(100.0) for v in report.per_class.values())


def test_panoptic_and_semantic_ground_truth_score_perfectly(eval_world, tmp_path):
    dataset = eval_world["coco-panoptic"]
    gt = load_ground_truth("genseg-panoptic", dataset)
    folder = tmp_path / "pred"
    folder.mkdir()
    annotations, semantic = [], []
    for record in gt.records:
        ids, segments = gt.panoptic(record)
        name = f"{record.key}.png"
        Image.fromarray(id_to_rgb(ids)).save(folder / name)
        annotations.append({"image_id": record.source.upstream_ids["image_id"], "file_name": name,
                            "segments_info": [{"id": i, "category_id": c} for i, c, crowd in segments]})
        labels = load_ground_truth("genseg-semantic", dataset).semantic(record)
        for k in np.unique(labels).tolist():
            if k != 255:
                semantic.append({"image_id": record.source.upstream_ids["image_id"],
                                 "category_id": gt.categories[k]["id"], "segmentation": _rle(labels == k)})
    report = score("genseg-panoptic", dataset, _write(tmp_path / "pred.json", {"annotations": annotations}))
    assert report.scores["PQ"] == pytest.approx(100.0) and report.scores["n"] > 0
    sem = score("genseg-semantic", dataset, _write(tmp_path / "sem.json", semantic))
    assert sem.scores["mIoU"] == pytest.approx(100.0) and sem.scores["pACC"] == pytest.approx(100.0)


def test_gcg_ground_truth_scores_perfectly(eval_world, tmp_path):
    dataset = eval_world["gcg-eval"]
    gt = load_ground_truth("gcgseg", dataset)
    entries = [{"image_id": record.source.upstream_ids["image_id"], "caption": record.captions[0],
                "phrases": phrases, "segmentations": [_rle(m) for m in masks]}
               for record, phrases, masks in gt.gcg_samples()]
    report = score("gcgseg", dataset, _write(tmp_path / "gcg.json", entries))
    assert report.scores["AP50"] == pytest.approx(100.0) and report.scores["mIoU"] == pytest.approx(100.0)
    assert "recall" not in report.scores  # no text model given: not reported, never faked


def test_missing_predictions_are_scored_empty_and_listed(eval_world, tmp_path):
    entries = _referring_truth("refseg", eval_world["refcoco"], "val")
    report = score("refseg", eval_world["refcoco"], _write(tmp_path / "p.json", entries[1:]), split="val")
    assert report.missing == [entries[0]["key"]]
    assert report.per_sample[entries[0]["key"]] == 0.0 and report.scores["gIoU"] < 100.0


def test_bad_prediction_files_name_the_entry(eval_world, tmp_path):
    dataset = eval_world["refcoco"]
    entries = _referring_truth("refseg", dataset, "val")
    with pytest.raises(PredictionError, match="name no evaluation item.*refcoco-val-x#0.*--split"):
        score("refseg", dataset, _write(tmp_path / "a.json", [*entries, {"key": "refcoco-val-x#0", "segmentation": None}]),
              split="val")
    with pytest.raises(PredictionError, match="two predictions for"):
        score("refseg", dataset, _write(tmp_path / "b.json", [*entries, entries[0]]), split="val")
    small = dict(entries[0], segmentation=_rle(np.ones((4, 4), bool)))
    with pytest.raises(PredictionError, match=r"mask size \[4, 4\] != image size"):
        score("refseg", dataset, _write(tmp_path / "c.json", [small]), split="val")
    with pytest.raises(PredictionError, match="entry 0 needs a \"key\""):
        score("refseg", dataset, _write(tmp_path / "d.json", [{"segmentation": None}]), split="val")
    (tmp_path / "e.json").write_text("[{")
    with pytest.raises(PredictionError, match="e.json is not valid JSON"):
        score("refseg", dataset, tmp_path / "e.json", split="val")


def test_ground_truth_errors_say_what_to_do(eval_world):
    with pytest.raises(GroundTruthError, match="holds the splits testA, testB, train, val: name the one"):
        load_ground_truth("refseg", eval_world["refcoco"])
    with pytest.raises(GroundTruthError, match="holds refseg records; task genseg-panoptic needs genseg"):
        load_ground_truth("genseg-panoptic", eval_world["refcoco"], split="val")
    with pytest.raises(GroundTruthError, match="unknown task"):
        load_ground_truth("panoptic", eval_world["refcoco"])
    gt = load_ground_truth("intseg", eval_world["coco-interactive"], view=View(prompt_kind="box"))
    points_only = gt.records[0].model_copy(
        update={"visual_prompts": [vp for vp in gt.records[0].visual_prompts if vp.kind == "point"]})
    with pytest.raises(GroundTruthError, match=f"record {points_only.key} has no box prompt \\(it has point\\)"):
        gt.prompted(points_only)
    with pytest.raises(GroundTruthError, match="prompt_kind must be one of point, scribble, box, mask"):
        View.from_mapping({"prompt_kind": "lasso"}, "benchmark x")


def test_cli_prints_json(eval_world, tmp_path):
    pred = _write(tmp_path / "masks.json", _referring_truth("grefseg", eval_world["grefcoco"])[1:])
    proc = run_cli("eval", "score", "--task", "grefseg", "--gt", str(eval_world["grefcoco"]), "--pred", str(pred),
                   "--json")
    doc = json.loads(proc.stdout)
    assert doc["task"] == "grefseg" and doc["split"] == "val" and doc["missing"] == 1
    assert set(doc["scores"]) >= {"cIoU", "gIoU", "N-acc", "T-acc"}
    assert "scored as empty" in proc.stderr
    bad = invoke_cli("eval", "score", "--task", "nope", "--gt", str(eval_world["grefcoco"]), "--pred", str(pred),
                  check=False)
    assert bad.returncode == 2 and "unknown --task 'nope'" in bad.stderr


def test_reasoning_scores_short_and_long_queries_apart(task_world, tmp_path):
    """ReasonSeg (the example's train split: the only one the sample has) scored per query, grouped by the
    query's kind as X-SAM's test table is (short / long); the ignore shapes stay out of I and U."""
    dataset = task_world["reasonseg"]
    gt = load_ground_truth("reaseg", dataset, split="train")
    samples = list(gt.referring_samples())
    assert {s.group for s in samples} <= {"short", "long"} and len(samples) == sum(len(r.phrases) for r in gt.records)
    entries = [{"key": s.key, "segmentation": _rle(s.gt_mask())} for s in samples]
    report = score("reaseg", dataset, _write(tmp_path / "r.json", entries), split="train")
    assert report.scores["gIoU"] == pytest.approx(100.0) and report.scores["cIoU"] == pytest.approx(100.0)
    for group in {s.group for s in samples}:
        assert report.scores[f"{group}/gIoU"] == pytest.approx(100.0)
    # predicting the whole image: the ignore region (when a record has one) is not counted as a miss
    whole = [{"key": s.key, "segmentation": _rle(np.ones_like(s.gt_mask()))} for s in samples]
    report = score("reaseg", dataset, _write(tmp_path / "w.json", whole), split="train")
    expected = []
    for s in samples:
        keep = ~s.ignore() if s.ignore() is not None else np.ones_like(s.gt_mask())
        expected.append((s.gt_mask() & keep).sum() / keep.sum())
    assert report.scores["gIoU"] == pytest.approx(100 * np.mean(expected))
