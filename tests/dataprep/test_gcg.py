"""The GCG converter end to end (real Ray) on the derived examples of `dataprep/examples/gcg.py`
(GranD-f, OpenPSG-GCG, RefCOCOg-GCG, Flickr-GCG and the GranD-f val GT, built from the real COCO
samples), plus bad inputs made from them: overlapping spans, a phrase missing from the caption,
a 2-word Flickr caption. Reference masks are decoded here with pycocotools as the upstream loaders do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import dataset_files
from builders import read_records as read_samples
from pycocotools import mask as mask_utils

from dataprep.convert import ConvertParams
from dataprep.examples.gcg import build
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks
from xsam.data.schema import SEG_TOKEN, ShardSample


def convert(inputs: dict[str, str], out: Path) -> dict:
    return run_conversion("gcg", str(out), inputs, ConvertParams(), num_workers=1).meta


def quarantine(out: Path) -> list[tuple[str, str, str, str]]:
    return sorted((r["key"], r["level"], r["reason"], r["part_id"]) for r in read_parquet(open_storage(out), QUARANTINE))


def decode_any(seg, h: int, w: int) -> np.ndarray:
    """X-SAM decode_mask: one RLE, RLEs or polygons, OR-ed."""
    if isinstance(seg, dict):
        seg = [seg]
    out = np.zeros((h, w), dtype=np.uint8)
    for s in seg:
        m = mask_utils.decode(s) if isinstance(s, dict) else mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([s], h, w)))
        out = np.maximum(out, m)
    return out.astype(bool)


def check_rendering(sample: ShardSample) -> None:
    record = sample.record
    caption = record.captions[0]
    for phrase, (s, e) in zip(record.phrases, record.meta["phrase_char_spans"], strict=True):
        assert caption[s:e] == phrase
    (item,) = sample.items
    assert [t.role for t in item.turns] == ["user", "assistant"]
    answer = item.turns[1].text
    assert answer.count(SEG_TOKEN) == 1 and len(item.segs) == 1
    for phrase in record.phrases:
        assert f"<p>{phrase}</p>" in answer
    # X-SAM's tag_caption adds a space after every </p> (and a final "." when missing)
    plain = " ".join(answer.replace("<p>", "").replace("</p>", "").split()).replace(" .", ".")
    assert plain.startswith(" ".join(caption.split()))
    order = sorted(range(len(record.phrases)), key=lambda p: record.meta["phrase_char_spans"][p][0])
    assert [sp.phrase_index for sp in item.spans] == order
    targets = [(t.segment, item.spans[t.span].phrase_index) for t in item.segs[0].targets]
    assert targets == [(s, p) for p in order for s in record.meta["phrase_segments"][p]]


@pytest.fixture(scope="module")
def examples(corpora, tmp_path_factory) -> dict[str, dict[str, str]]:
    return build(corpora, tmp_path_factory.mktemp("gcg") / "in")


def test_builder_deterministic(corpora, tmp_path, examples):
    again = build(corpora, tmp_path / "again")
    first = Path(examples["gcg-grandf"]["annotations"]).parents[4]
    assert dataset_files(first) == dataset_files(tmp_path / "again")
    assert "DERIVED" in (tmp_path / "again" / "README.md").read_text()
    assert set(again) == {"gcg-grandf", "gcg-psg", "gcg-refcocog", "gcg-flickr", "gcg-eval"}


def test_grandf_spans_masks_overlap_and_identity(ray_session, examples, tmp_path):
    inputs = dict(examples["gcg-grandf"])
    data = json.loads(Path(inputs["annotations"]).read_text())
    g = data[0]["groundings"]  # "Two cats lie on a pink couch next to two remotes."
    g["cats lie"] = {"token_positives": [4, 12], "rle_masks": g["Two cats"]["rle_masks"]}  # overlaps "two cats"
    g["next to"] = {"token_positives": [29, 36], "rle_masks": g["two remotes"]["rle_masks"]}  # kept
    g["a dog"] = {"token_positives": [0, 5], "rle_masks": g["Two cats"]["rle_masks"]}  # not in the caption
    bad = Path(tmp_path / "GranDf_HA_GCG_train.json")
    bad.write_text(json.dumps(data))
    inputs["annotations"] = str(bad)
    meta = convert(inputs, tmp_path / "a")
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 2
    assert totals["quarantined_parts"] == 2
    assert quarantine(tmp_path / "a") == [
        ("gcg-grandf-train-000000039769", "part", "upstream_filter", "3"),
        ("gcg-grandf-train-000000039769", "part", "upstream_filter", "5"),
    ]
    samples = read_samples(tmp_path / "a")
    assert sorted(samples) == ["gcg-grandf-train-000000039769", "gcg-grandf-train-000000439180"]
    rec = samples["gcg-grandf-train-000000039769"].record
    assert rec.phrases == ["two cats", "a pink couch", "next to", "two remotes"]
    assert rec.captions == ["two cats lie on a pink couch next to two remotes."]
    for entry in data:
        sample = samples[f"gcg-grandf-train-{entry['image_id']:012d}"]
        check_rendering(sample)
        rec = sample.record
        h, w = rec.image.height, rec.image.width
        for p, phrase in enumerate(rec.phrases):
            upstream = next(v for k, v in entry["groundings"].items() if k.lower() == phrase)
            assert list(upstream["token_positives"]) == rec.meta["phrase_char_spans"][p]
            (s,) = rec.meta["phrase_segments"][p]
            assert np.array_equal(masks.decode(rec.segments[s].rle), decode_any(upstream["rle_masks"], h, w))
    assert lint_dataset(open_storage(tmp_path / "a")).ok
    convert(inputs, tmp_path / "b")
    assert dataset_files(tmp_path / "a") == dataset_files(tmp_path / "b")


def test_psg_and_refcocog(ray_session, examples, tmp_path):
    convert(examples["gcg-psg"], tmp_path / "psg")
    (sample,) = read_samples(tmp_path / "psg").values()
    check_rendering(sample)
    assert sample.record.phrases == ["a group of people", "horses", "two trucks", "the grass"]
    assert len(sample.record.segments[0].rle.counts) > 0

    inputs = examples["gcg-refcocog"]
    entry = next(iter(json.loads(Path(inputs["annotations"]).read_text())[0].values()))
    convert(inputs, tmp_path / "ref")
    samples = read_samples(tmp_path / "ref")
    assert list(samples) == ["gcg-refcocog-train-000000039769"]
    sample = samples["gcg-refcocog-train-000000039769"]
    check_rendering(sample)
    rec = sample.record
    assert rec.phrases == [r["sentence"] for r in entry["refs"]]
    for p, ref in enumerate(entry["refs"]):
        assert np.array_equal(masks.decode(rec.segments[p].rle), decode_any(ref["segmentation"], rec.image.height, rec.image.width))
    assert lint_dataset(open_storage(tmp_path / "ref")).ok


def test_flickr_short_caption_quarantined(ray_session, examples, tmp_path):
    inputs = dict(examples["gcg-flickr"])
    data = json.loads(Path(inputs["annotations"]).read_text())
    good = json.loads(json.dumps(data))
    data["images"].append({"id": 39769, "file_name": "000000039769.png", "height": 480, "width": 640, "caption": "Two cats"})
    ann = dict(data["annotations"][0], id=5000, image_id=39769, tokens_positive=[[0, 8]])
    data["annotations"].append(ann)
    bad = tmp_path / "flickr_mergedGT_GCG_train.json"
    bad.write_text(json.dumps(data))
    inputs["annotations"] = str(bad)
    meta = convert(inputs, tmp_path / "out")
    assert meta["totals"]["records_read"] == meta["totals"]["samples"] + meta["totals"]["quarantined"] == 2
    assert quarantine(tmp_path / "out") == [("gcg-flickr-train-000000039769", "record", "upstream_filter", "")]
    (sample,) = read_samples(tmp_path / "out").values()
    check_rendering(sample)
    rec = sample.record
    assert rec.phrases == ["a man", "a horse", "two trucks"]
    for seg, ann in zip(rec.segments, good["annotations"], strict=True):
        assert seg.id == ann["id"]
        assert np.array_equal(masks.decode(seg.rle), mask_utils.decode(ann["sam_mask"]).astype(bool))


def test_eval_ground_truth(ray_session, examples, tmp_path):
    inputs = examples["gcg-eval"]
    mask_gt = json.loads(Path(inputs["annotations"]).read_text())
    cap_gt = json.loads(Path(inputs["annotations"].replace("_mask_gt", "_caption_gt")).read_text())
    meta = convert(inputs, tmp_path / "out")
    assert meta["totals"]["records_read"] == meta["totals"]["samples"] == 1
    samples = read_samples(tmp_path / "out")
    assert list(samples) == ["gcg-eval-val-000000439180"]
    sample = samples["gcg-eval-val-000000439180"]
    assert sample.items[0].mode == "eval"
    check_rendering(sample)
    rec = sample.record
    assert rec.captions == [cap_gt["annotations"][0]["caption"]]
    assert rec.meta["gt_labels"] == cap_gt["annotations"][0]["labels"] == rec.phrases
    for seg, ann in zip(rec.segments, mask_gt["annotations"], strict=True):
        assert seg.id == ann["id"] and seg.category_id == 1
        assert np.array_equal(masks.decode(seg.rle), mask_utils.decode(ann["segmentation"]).astype(bool))
    assert lint_dataset(open_storage(tmp_path / "out")).ok
