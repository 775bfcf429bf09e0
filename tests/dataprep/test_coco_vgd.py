"""COCO-VGD -> vgdseg from the real COCO instances samples: seeded prompt GEOMETRY that follows X-SAM's
`vprompt.py` (checked by rasterising), deterministic conversions, crowd instances without prompts,
category-level targets, rendering, lint and quarantine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from builders import dataset_files
from builders import read_records as read_samples
from pycocotools import mask as mask_utils

from dataprep.convert import ConvertParams
from dataprep.examples import coco_vgd as example
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks, vprompts
from xsam.data.schema import REGION_TOKEN, SEG_TOKEN

CORPUS = "coco-vgd"




def ref_mask(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        return mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        ).astype(bool)
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.decode(seg).astype(bool)


@pytest.fixture(scope="module")
def converted(ray_session, corpora, tmp_path_factory):
    base = tmp_path_factory.mktemp("vgd")
    inputs = example.build(corpora, base / "in")[CORPUS]
    outs = [base / "a", base / "b"]
    metas = [
        run_conversion(CORPUS, str(o), inputs, ConvertParams(), num_workers=1).meta
        for o in outs
    ]
    return inputs, outs, metas


def check_record(record, upstream: dict) -> None:
    img = upstream["images"][0]
    h, w = img["height"], img["width"]
    anns = {a["id"]: a for a in upstream["annotations"] if a["image_id"] == img["id"]}
    assert [s.id for s in record.segments] == sorted(anns)
    ref = {i: ref_mask(a["segmentation"], h, w) for i, a in anns.items()}
    for seg in record.segments:
        assert np.array_equal(masks.decode(seg.rle), ref[seg.id])
    non_crowd = [i for i in sorted(anns) if not anns[i]["iscrowd"]]
    sources = [vp.geometry["from_segment"] for vp in record.visual_prompts]
    assert sorted(set(sources)) == non_crowd  # crowd instances get no prompts
    for vp in record.visual_prompts:
        src = vp.geometry["from_segment"]
        cat = anns[src]["category_id"]
        assert vp.segment_ids == [i for i in non_crowd if anns[i]["category_id"] == cat]
        assert vp.seed == vprompts.prompt_seed(record.key, src, vp.kind)
        raster = vprompts.rasterise_prompt(vp, h, w)
        m = ref[src]
        ys, xs = np.nonzero(m)
        if vp.kind == "point":
            assert vp.rle is None and len(vp.geometry["points"]) >= 1
            assert all(
                m[y, x] for x, y in vp.geometry["points"]
            )  # every point on the mask
            if (
                len(vp.geometry["points"]) == 1
            ):  # one component: near its centroid, a radius-10 disc
                x, y = vp.geometry["points"][0]
                half = min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * 0.5
                assert np.hypot(y - ys.mean(), x - xs.mean()) <= half * np.sqrt(2) + 1
                yy, xx = np.ogrid[:h, :w]
                assert np.array_equal(raster, (yy - y) ** 2 + (xx - x) ** 2 <= 100)
        elif vp.kind == "box":
            assert vp.rle is None
            x0, y0, x1, y1 = vp.geometry["boxes"][0]
            bw, bh = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
            if len(vp.geometry["boxes"]) == 1:
                # the box scaled by s in [0.9, 1.1] about its centre, then clipped to the image
                lo_x, hi_x, lo_y, hi_y = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
                assert max(0, lo_x - 0.05 * bw) - 1 <= x0 <= lo_x + 0.05 * bw + 1
                assert hi_x - 0.05 * bw - 1 <= x1 <= min(w, hi_x + 0.05 * bw + 1)
                assert max(0, lo_y - 0.05 * bh) - 1 <= y0 <= lo_y + 0.05 * bh + 1
                assert hi_y - 0.05 * bh - 1 <= y1 <= min(h, hi_y + 0.05 * bh + 1)
                assert raster.sum() == (x1 - x0) * (y1 - y0)
        elif vp.kind == "scribble":
            assert vp.rle is None and raster.any()
        else:
            assert vp.rle is not None
            # X-SAM's mask prompt: Gaussian blur (sigma 2) > the blurred image's mean, i.e. a
            # slightly grown mask (thin objects grow relatively more)
            assert (raster & m).sum() >= 0.95 * m.sum()
            ry, rx = np.nonzero(raster)
            assert (
                ry.min() >= ys.min() - 8 and ry.max() <= ys.max() + 8
            )  # within 4 sigma of the mask
            assert rx.min() >= xs.min() - 8 and rx.max() <= xs.max() + 8
    [item] = record_items(record)  # evaluation (val2017): one region per category present
    assert item.turns[0].text.count(REGION_TOKEN) == len({vp.phrase_index for vp in record.visual_prompts})
    assert item.turns[1].text.count(SEG_TOKEN) == 1


def record_items(record):
    from xsam.data.render import load_templates, render_record

    return render_record(record, seed=0, epoch=0, templates=load_templates())


def test_generated_prompts(converted):
    inputs, [out, out2], [meta, _] = converted
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 1
    upstream = json.loads(Path(inputs["annotations"]).read_text())
    [sample] = read_samples(out).values()
    check_record(sample.record, upstream)
    assert len(sample.record.visual_prompts) == 24 and sample.record.phrases == [
        "remote",
        "couch",
        "bed",
        "cat",
    ]
    assert dataset_files(out) == dataset_files(
        out2
    )  # seeded: two conversions are byte-identical
    assert lint_dataset(open_storage(out)).ok


def test_crowd_rle_and_quarantine(ray_session, corpora, tmp_path):
    src = corpora / "coco_instances"
    doc = json.loads(
        (src / "annotations" / "panoptic_coco_detection_format.json").read_text()
    )
    doc["annotations"] = [
        a for a in doc["annotations"] if a["iscrowd"] or a["id"] % 4 == 0
    ]
    doc["annotations"][0]["category_id"] = 9999  # unknown category -> part quarantine
    doc["images"].append(
        {**doc["images"][0], "id": 7}
    )  # no annotation -> record quarantine
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out"
    meta = run_conversion(
        CORPUS,
        str(out),
        {"annotations": str(path), "images": str(src / "val2017")},
        ConvertParams(),
        num_workers=1,
    ).meta
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 2
    rows = sorted(
        (r["level"], r["reason"], r["part_id"])
        for r in read_parquet(open_storage(out), QUARANTINE)
    )
    assert rows == [
        ("part", "unknown_category", str(doc["annotations"][0]["id"])),
        ("record", "missing_annotation", ""),
    ]
    [sample] = read_samples(out).values()
    doc["annotations"] = doc["annotations"][1:]
    check_record(sample.record, doc)
    assert (
        any(s.iscrowd for s in sample.record.segments)
        and sample.record.ignore is not None
    )


def _python_sin(x: float) -> float:
    """`det_sin`'s steps in plain Python floats (IEEE doubles: +, -, *, / correctly rounded)."""
    r = x - round(x / vprompts._TWO_PI) * vprompts._TWO_PI  # round(): half to even, as np.rint
    if r > vprompts._HALF_PI:
        r = vprompts._PI - r
    if r < -vprompts._HALF_PI:
        r = -vprompts._PI - r
    r2, p = r * r, vprompts._SIN_COEFFS[0]
    for c in vprompts._SIN_COEFFS[1:]:
        p = p * r2 + c
    return r * p


def _python_exp(x: float) -> float:
    k = round(x / vprompts._LN2_HI)
    r = (x - k * vprompts._LN2_HI) - k * vprompts._LN2_LO
    p = vprompts._EXP_COEFFS[0]
    for c in vprompts._EXP_COEFFS[1:]:
        p = p * r + c
    return math.ldexp(p, k)


def test_prompt_math_is_the_same_bits_everywhere():
    """The sines and exponentials behind prompt geometry and rasters are basic IEEE operations only:
    numpy's vectorised `det_*` equal, bit for bit, the same steps in plain Python floats (which no
    SIMD kernel or libm variant touches), and they agree with libm to 2 ulp where it matters."""
    rng = np.random.default_rng(7)
    angles = np.concatenate([rng.uniform(0, 2 * math.pi, 3000), rng.uniform(-13, 13, 3000),
                             [0.0, math.pi / 2, math.pi, 2 * math.pi, -math.pi / 2]])
    sin, cos = vprompts.det_sin(angles), vprompts.det_cos(angles)
    assert [float(v) for v in sin] == [_python_sin(float(a)) for a in angles]
    assert [float(v) for v in cos] == [_python_sin(float(a) + vprompts._HALF_PI) for a in angles]
    assert vprompts.det_sin(1.0) == _python_sin(1.0) and isinstance(vprompts.det_sin(1.0), float)
    assert np.abs(sin - np.sin(angles)).max() < 1e-15 and np.abs(cos - np.cos(angles)).max() < 1e-15
    folded = rng.uniform(-math.pi / 2, math.pi / 2, 3000)
    assert (np.abs(vprompts.det_sin(folded) - np.sin(folded)) <= 2 * np.spacing(np.abs(np.sin(folded)))).all()
    xs = np.concatenate([rng.uniform(-6, 0, 3000), rng.uniform(-700, 700, 300)])
    exp = vprompts.det_exp(xs)
    assert [float(v) for v in exp] == [_python_exp(float(x)) for x in xs]
    assert (np.abs(exp / np.exp(xs) - 1) < 4.5e-16).all()
