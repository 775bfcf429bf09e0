"""COCO-Interactive (PSALM JSON) -> intseg, end to end on an input DERIVED from the real COCO samples
(`dataprep.examples.coco_interactive`): prompt RLEs kept byte-for-byte, segments pixel-exact against
pycocotools on the upstream JSON, crowd annotations without prompts, rendering, byte-identity,
lint, quarantine paths and the per-type `--flavor`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import dataset_files
from builders import read_records as read_samples
from pycocotools import mask as mask_utils

from dataprep.convert import ConvertParams
from dataprep.examples import coco_interactive as example
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks, vprompts
from xsam.data.schema import REGION_TOKEN, SEG_TOKEN

CORPUS = "coco-interactive"




def ref_mask(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        return mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        ).astype(bool)
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"]}).astype(
        bool
    )


@pytest.fixture(scope="module")
def converted(ray_session, corpora, tmp_path_factory):
    base = tmp_path_factory.mktemp("intseg")
    inputs = example.build(corpora, base / "in")[CORPUS]
    outs = []
    for name in ("a", "b"):
        outcome = run_conversion(
            CORPUS, str(base / name), inputs, ConvertParams(), num_workers=1
        )
        outs.append((base / name, outcome.meta))
    return inputs, outs


def test_records_and_prompts(converted):
    inputs, [(out, meta), (out2, _)] = converted
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 2
    upstream = json.loads(Path(inputs["annotations"]).read_text())
    samples = read_samples(out)
    quarantine = read_parquet(open_storage(out), QUARANTINE)
    assert {r["reason"] for r in quarantine} == {"crowd_region"} and all(r["level"] == "part" for r in quarantine)
    assert sorted(samples) == [
        "coco-interactive-val-000000039769",
        "coco-interactive-val-000000439180",
    ]
    for rec_in in upstream:
        info = rec_in["image_info"]
        sample = samples[f"coco-interactive-val-{info['id']:012d}"]
        record = sample.record
        h, w = info["height"], info["width"]
        anns = {a["id"]: a for a in rec_in["anns"]}
        assert [s.id for s in record.segments] == sorted(anns)
        for seg in record.segments:
            assert np.array_equal(
                masks.decode(seg.rle), ref_mask(anns[seg.id]["segmentation"], h, w)
            )
            assert seg.iscrowd == bool(anns[seg.id]["iscrowd"])
        crowd = [a for a in anns.values() if a["iscrowd"]]
        if crowd:
            want = np.any([ref_mask(a["segmentation"], h, w) for a in crowd], axis=0)
            assert np.array_equal(masks.decode(record.ignore), want)
        # every prompt of every non-crowd instance, RLE counts byte-equal to upstream; the prompts
        # on crowd instances are parts of the quarantine (crowd_region), not dropped unseen
        assert sorted(
            (r["record_id"], r["part_id"]) for r in quarantine if r["reason"] == "crowd_region"
            and r["record_id"] == str(info["id"])
        ) == sorted((str(info["id"]), f"{a['id']}:{kind}") for a in crowd for kind in vprompts.KINDS)
        want_prompts = [
            (a["id"], kind, a[f"{kind}_visual_prompt_mask"]["counts"])
            for a in sorted(anns.values(), key=lambda a: a["id"])
            if not a["iscrowd"]
            for kind in vprompts.KINDS
        ]
        got = [
            (vp.segment_ids[0], vp.kind, vp.rle.counts) for vp in record.visual_prompts
        ]
        assert got == want_prompts
        assert all(len(vp.segment_ids) == 1 for vp in record.visual_prompts)
        for vp in record.visual_prompts:
            raster = vprompts.rasterise_prompt(vp, h, w)
            raw = masks.decode(vp.rle)
            if vp.kind in ("point", "scribble"):
                assert vp.geometry == {"dilate_radius": 10 if vp.kind == "point" else 5}
                assert raster.sum() > raw.sum() and raster[raw].all()
            else:
                assert np.array_equal(raster, raw)
        # evaluation rendering (split val): one item per instance, one <region>, one <SEG>,
        # the instance's mask as the only target (X-SAM's intseg evaluation samples)
        instances = {tuple(vp.segment_ids) for vp in record.visual_prompts}
        assert len(sample.items) == len(instances)
        index = {s.id: i for i, s in enumerate(record.segments)}
        for item in sample.items:
            assert [t.role for t in item.turns] == ["user", "assistant"]
            assert item.turns[0].text.count(REGION_TOKEN) == 1 == len(item.spans)
            assert item.turns[1].text.count(SEG_TOKEN) == 1 and len(item.segs) == 1
            (t,) = item.segs[0].targets
            vp = record.visual_prompts[item.spans[0].prompt_index]
            assert t.segment == index[vp.segment_ids[0]]
    assert not any(
        s.record.segments[i].iscrowd
        for s in samples.values()
        for vp in s.record.visual_prompts
        for i, seg in enumerate(s.record.segments)
        if seg.id in vp.segment_ids
    )
    assert dataset_files(out) == dataset_files(out2)
    assert lint_dataset(open_storage(out)).ok


def test_quarantine_and_flavor(converted, tmp_path):
    inputs, _ = converted
    doc = json.loads(Path(inputs["annotations"]).read_text())
    h, w = doc[1]["image_info"]["height"], doc[1]["image_info"]["width"]
    empty = mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
    anns = [a for a in doc[1]["anns"] if not a["iscrowd"]]
    anns[0]["box_visual_prompt_mask"] = {
        "size": [h, w],
        "counts": empty["counts"].decode(),
    }
    anns[1]["box_visual_prompt_mask"] = {
        "size": [h + 1, w],
        "counts": anns[1]["box_visual_prompt_mask"]["counts"],
    }
    doc.append(
        {"image": "x.png", "image_info": {**doc[0]["image_info"], "id": 1}, "anns": []}
    )
    bad = tmp_path / "coco_interactive_val_psalm.json"
    bad.write_text(json.dumps(doc))
    out = tmp_path / "out"
    outcome = run_conversion(
        CORPUS,
        str(out),
        {**inputs, "annotations": str(bad), "flavor": "box"},
        ConvertParams(),
        num_workers=1,
    )
    totals = outcome.meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 3
    rows = sorted(
        (r["level"], r["reason"], r["part_id"])
        for r in read_parquet(open_storage(out), QUARANTINE)
    )
    # the example gives crowd annotations prompts too (as PSALM's builder does): with --flavor box
    # each crowd annotation's box prompt is one crowd_region row, on both images
    crowd = sorted(
        f"{a['id']}:box" for rec in doc for a in rec["anns"] if a["iscrowd"] and "box_visual_prompt_mask" in a
    )
    assert len(crowd) == 2
    assert rows == sorted([
        ("part", "empty_mask", f"{anns[0]['id']}:box"),
        ("part", "size_mismatch", f"{anns[1]['id']}:box"),
        ("record", "missing_annotation", ""),
        *(("part", "crowd_region", c) for c in crowd),
    ])
    for sample in read_samples(out).values():
        assert {vp.kind for vp in sample.record.visual_prompts} == {"box"}
