"""ReasonSeg (LISA layout) end to end on the example release derived from the real COCO samples.

Reference masks are computed here independently, with PIL's `ImageDraw.polygon(fill, outline)` on
the int32-truncated points painted in LISA's order (largest first, ignore = 255, flag skipped). PIL's
boundary rule is not OpenCV's, so converter and reference may differ only on pixels next to a
polygon outline. OpenCV itself is not a dependency: `test_rasteriser_equals_opencv_golden` compares
the rasteriser pixel for pixel with masks real OpenCV drew once (`data/opencv_polygons.json`,
written by `data/make_opencv_polygons.py`, whose docstring says how to regenerate it).

Ignore, precisely: LISA paints shapes largest first, so `ignore` = pixels whose LAST painted shape is
an ignore shape, = union of ignore rasters minus the pixels of target shapes smaller than that ignore
shape; the target segment = pixels whose last painted shape is a target shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import dataset_files, read_samples
from PIL import Image as PILImage
from PIL import ImageDraw

from dataprep.convert import ConvertParams
from dataprep.converters.reasonseg import (
    decode_annotation,
    lisa_label_map,
    polygon_raster,
)
from dataprep.examples.reasonseg import NAME_CATS, NAME_REMOTES, NAME_RIDER, build
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks
from xsam.data.render import RenderOptions, load_templates, render_record
from xsam.data.schema import SEG_TOKEN


GOLDEN = Path(__file__).parent / "data" / "opencv_polygons.json"


def runs_to_mask(runs: list[int], h: int, w: int) -> np.ndarray:
    """Row-major run lengths, alternating 0-runs and 1-runs from a 0-run, -> (h, w) bool."""
    if sum(runs) != h * w:
        raise ValueError(f"runs cover {sum(runs)} pixels, the image has {h * w}")
    return np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(h, w)


def pil_raster(points: list[list[float]], h: int, w: int) -> np.ndarray:
    img = PILImage.new("L", (w, h), 0)
    pts = [tuple(int(v) for v in p) for p in np.array(points, dtype=np.float64).astype(np.int32).tolist()]
    ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
    return np.asarray(img).astype(bool)


def pil_label_map(doc: dict, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    shapes = [s for s in doc["shapes"] if s["label"].lower() != "flag"]
    rasters = [pil_raster(s["points"], h, w) for s in shapes]
    label = np.zeros((h, w), np.uint8)
    for i in np.argsort([r.sum() for r in rasters])[::-1]:
        label[rasters[i]] = 255 if "ignore" in shapes[i]["label"].lower() else 1
    return label == 1, label == 255


def near_outline(doc: dict, h: int, w: int) -> np.ndarray:
    """Pixels within 1 px of any polygon outline (where rasterisers may legitimately disagree)."""
    img = PILImage.new("L", (w, h), 0)
    for s in doc["shapes"]:
        pts = [tuple(p) for p in np.array(s["points"], float).astype(np.int32).tolist()]
        ImageDraw.Draw(img).line(pts + [pts[0]], fill=1, width=1)
    edge = np.asarray(img).astype(bool)
    grown = edge.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(edge, dy, 0), dx, 1)
    return grown


@pytest.fixture(scope="module")
def example(tmp_path_factory, corpora) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rs")
    return root, build(corpora, root / "ex")["reasonseg"]


@pytest.fixture(scope="module")
def converted(example, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    _, inputs = example
    out = tmp_path_factory.mktemp("out") / "a"
    outcome = run_conversion("reasonseg", str(out), inputs, ConvertParams(), num_workers=1)
    return out, outcome.meta


def test_builder_deterministic(example, corpora, tmp_path):
    root, _ = example
    build(corpora, tmp_path / "again")
    assert dataset_files(root / "ex") == dataset_files(tmp_path / "again")


def test_cp1252_decodes(example):
    src = Path(example[1]["src"])
    raw = (src / f"{NAME_CATS}.json").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    doc, encoding = decode_annotation(raw)
    assert encoding == "cp1252" and "cat’s" in doc["text"][0]
    assert decode_annotation((src / f"{NAME_REMOTES}.json").read_bytes())[1] == "utf-8"
    with pytest.raises(ValueError):
        decode_annotation(b'{"text": ["\x81"]}')  # 0x81 is undefined in cp1252 and invalid UTF-8


def test_rasteriser_vs_pil_and_flag(example):
    src = Path(example[1]["src"])
    doc = decode_annotation((src / f"{NAME_CATS}.json").read_bytes())[0]
    h, w = 480, 640
    for s in doc["shapes"]:
        ours = polygon_raster(np.array(s["points"], float).astype(np.int32), h, w)
        ref = pil_raster(s["points"], h, w)
        diff = ours != ref
        edge = near_outline({"shapes": [s]}, h, w)
        assert not (diff & ~edge).any(), s["label"]  # disagreement only along the outline
        assert diff.sum() < 0.2 * edge.sum()
    # the flag shape has no effect at all
    no_flag = [s for s in doc["shapes"] if s["label"] != "flag"]
    assert np.array_equal(lisa_label_map(doc["shapes"], h, w), lisa_label_map(no_flag, h, w))
    # a small rectangle is exact under both rules: fill + outline cover [x0, x1] x [y0, y1]
    rect = np.array([[3, 2], [9, 2], [9, 6], [3, 6]])
    want = np.zeros((10, 12), bool)
    want[2:7, 3:10] = True
    assert np.array_equal(polygon_raster(rect, 10, 12), want)


def test_rasteriser_equals_opencv_golden():
    """Every polygon of the golden file, mostly crossing the image border, rasterises to exactly
    the mask `cv2.polylines(m, [pts], True, 1, 1)` + `cv2.fillPoly(m, [pts], 1)` gave."""
    doc = json.loads(GOLDEN.read_text())
    cases = doc["cases"]
    crossing = [c for c in cases
                if any(not (0 <= x < c["width"] and 0 <= y < c["height"]) for x, y in c["points"])]
    assert doc["opencv"].startswith("5.") and len(cases) >= 300 and len(crossing) >= 250
    assert {"border_lines", "far_outside", "very_far", "degenerate", "inside"} <= {c["kind"] for c in cases}
    wrong = []
    for i, case in enumerate(cases):
        h, w = case["height"], case["width"]
        want = runs_to_mask(case["runs"], h, w)
        got = polygon_raster(np.array(case["points"], dtype=np.int32), h, w)
        if not np.array_equal(got, want):
            wrong.append(f"case {i} ({case['kind']}, {w}x{h}): {int((got != want).sum())} pixels differ")
    assert not wrong, f"{len(wrong)} of {len(cases)} polygons differ from OpenCV: {wrong[:10]}"


def test_accounting_keys_lint(converted):
    out, meta = converted
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 2
    assert sorted(read_samples(out)) == [f"reasonseg-train-{NAME_REMOTES.lower()}", f"reasonseg-train-{NAME_CATS.lower()}"]
    assert meta["task"] == "reaseg" and meta["splits"] == ["train"]
    assert lint_dataset(open_storage(out)).ok


@pytest.mark.parametrize("name", [NAME_CATS, NAME_REMOTES])
def test_masks_and_record(converted, example, name):
    out, _ = converted
    src = Path(example[1]["src"])
    sample, members = read_samples(out)[f"reasonseg-train-{name.lower()}"]
    rec = sample.record
    assert members[rec.image.ext] == (src / f"{name}.jpg").read_bytes()
    doc = decode_annotation((src / f"{name}.json").read_bytes())[0]
    h, w = rec.image.height, rec.image.width
    target, ignore = pil_label_map(doc, h, w)
    edge = near_outline(doc, h, w)
    assert len(rec.segments) == 1
    got = masks.decode(rec.segments[0].rle)
    assert not ((got != target) & ~edge).any()
    got_ignore = masks.decode(rec.ignore) if rec.ignore is not None else np.zeros((h, w), bool)
    assert not ((got_ignore != ignore) & ~edge).any()
    assert not (got & got_ignore).any()
    # exact equality with LISA's rule on our rasteriser (OpenCV-equal inside the image)
    label = lisa_label_map(doc["shapes"], h, w)
    assert np.array_equal(got, label == 1) and np.array_equal(got_ignore, label == 255)
    assert rec.phrases == doc["text"]
    assert rec.meta["phrase_segments"] == [[0]] * len(doc["text"])
    assert rec.meta["is_sentence"] is doc["is_sentence"]
    if name == NAME_CATS:
        assert rec.ignore is not None and got_ignore.sum() > 1000
        expl = json.loads(Path(example[1]["explanations"]).read_text())[0]["outputs"]
        assert rec.meta["explanations"] == [expl, expl]
    else:
        assert rec.ignore is None and rec.meta["explanations"] == [None]


def test_items_train_and_eval(converted):
    out, _ = converted
    rec = read_samples(out)[f"reasonseg-train-{NAME_CATS.lower()}"][0].record
    templates = load_templates()
    for epoch in range(4):
        (item,) = render_record(rec, seed=0, epoch=epoch, templates=templates)
        assert item.mode == "train" and len(item.turns) == 2 * len(rec.phrases)
        assert sorted(s.phrase_index for s in item.spans) == [0, 1]
        assert len(item.segs) == 2 and all(t.text.count(SEG_TOKEN) == 1 for t in item.turns[1::2])
        assert all(s.targets[0].segment == 0 and len(s.targets) == 1 for s in item.segs)
    items = render_record(rec, seed=0, epoch=0, templates=templates, options=RenderOptions(mode="eval"))
    assert len(items) == len(rec.phrases) and all(len(i.turns) == 2 for i in items)
    assert [i.spans[0].phrase_index for i in items] == [0, 1]


def test_byte_identical(converted, example, ray_session, tmp_path):
    out, _ = converted
    run_conversion("reasonseg", str(tmp_path / "b"), example[1], ConvertParams(), num_workers=1)
    assert dataset_files(out) == dataset_files(tmp_path / "b")


def test_val_split_and_quarantine(example, ray_session, tmp_path):
    root, inputs = example
    bad = tmp_path / "val"
    shutil.copytree(Path(inputs["src"]).parent / "val", bad)
    doc = json.loads((bad / f"{NAME_RIDER}.json").read_text())
    img = (bad / f"{NAME_RIDER}.jpg").read_bytes()
    (bad / "undecodable.jpg").write_bytes(img)
    (bad / "undecodable.json").write_bytes(b'{"text": ["\x81"], "is_sentence": false, "shapes": []}')
    (bad / "no_json.jpg").write_bytes(img)
    (bad / "no_image.json").write_text(json.dumps(doc))
    (bad / "only_ignore.jpg").write_bytes(img)
    (bad / "only_ignore.json").write_text(json.dumps({**doc, "shapes": [{**doc["shapes"][0], "label": "ignore"}]}))
    (bad / "sliver.jpg").write_bytes(img)
    sliver = {**doc, "shapes": [*doc["shapes"], {"label": "target", "points": [[1, 1], [5, 5]], "shape_type": "polygon"}]}
    (bad / "sliver.json").write_text(json.dumps(sliver))
    out = tmp_path / "out"
    outcome = run_conversion("reasonseg", str(out), {"src": str(bad)}, ConvertParams(), num_workers=1)
    totals = outcome.meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 6
    assert outcome.meta["splits"] == ["val"]
    rows = sorted((r["key"], r["level"], r["reason"]) for r in read_parquet(open_storage(out), QUARANTINE))
    assert rows == [
        ("reasonseg-val-no_image", "record", "missing_file"),
        ("reasonseg-val-no_json", "record", "missing_annotation"),
        ("reasonseg-val-only_ignore", "record", "empty_mask"),
        ("reasonseg-val-sliver", "part", "degenerate_polygon"),
        ("reasonseg-val-undecodable", "record", "invalid_annotation"),
    ]
    samples = read_samples(out)
    assert sorted(samples) == [f"reasonseg-val-{NAME_RIDER.lower()}", "reasonseg-val-sliver"]
    sample = samples[f"reasonseg-val-{NAME_RIDER.lower()}"][0]
    # evaluation split: one item per query, template 0; the bbox polygon is an exact box
    assert [i.mode for i in sample.items] == ["eval"] and len(sample.items[0].turns) == 2
    got = masks.decode(sample.record.segments[0].rle)
    (x0, y0), (x1, y1) = np.array(doc["shapes"][0]["points"], float).astype(np.int32)[[0, 2]]
    want = np.zeros_like(got)
    want[y0 : min(y1, got.shape[0] - 1) + 1, x0 : min(x1, got.shape[1] - 1) + 1] = True
    assert np.array_equal(got, want)
    assert lint_dataset(open_storage(out)).ok
