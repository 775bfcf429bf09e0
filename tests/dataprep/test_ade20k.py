"""The ADE20K converter end to end (real Ray, real S3-free local output) on an ADEChallengeData2016
layout built from the real COCO panoptic sample (`ade20k_inputs`: no real ADE annotation exists here).

What is checked, per stored record, against `ade20k_inputs.reference_panoptic` (Mask2Former's rule):
every segment mask pixel-exactly; `ignore` = semantic 0; the semantic view; the instance view with
its 100-class ids; quarantine (size mismatch, missing PNG, bad instances); archive input; and the
prepared detectron2/X-SAM panoptic layout built from the same arrays.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ade20k_inputs import (
    AdeTruth,
    class_names,
    coco_truth,
    instance_mapping,
    png_bytes,
    reference_panoptic,
    write_release,
)
from builders import read_samples

from dataprep.convert import ConvertParams
from dataprep.converters import get_converter
from dataprep.converters.ade20k import Ade20k, semantic_label_map
from xsam.data.manifest import QUARANTINE, read_parquet
from dataprep.quarantine import InputError
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks
from xsam.data.schema import Record
from xsam.data.views import instance_view, semantic_map

SPLIT = "validation"
GOOD = ("ADE_val_00000001", "ADE_val_00000002")
ALL_IDS = list(range(1, 151))


def key(stem: str) -> str:
    return f"ade20k-{SPLIT}-{stem.lower()}"




def bbox_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


@pytest.fixture(scope="module")
def truths() -> dict[str, AdeTruth]:
    one = coco_truth(GOOD[0])  # the truck instance grown over tree and "other" pixels
    two = coco_truth(GOOD[1], grow=False)
    # instance 1 (a person) carries two instance classes -> part-level invalid_annotation
    person = two.instance[..., 1] == 1
    rows = np.nonzero(person.any(axis=1))[0]
    two.instance[person & (np.arange(two.instance.shape[0])[:, None] > rows.mean()), 0] = 53
    # instance 16 (a horse) has instance class 0 -> part-level unknown_category
    two.instance[two.instance[..., 1] == 16, 0] = 0
    # a semantic value outside 1..150 -> part-level unknown_category, ignored
    two.semantic[5:9, 600:610] = 200
    return {t.stem: t for t in (one, two)}


@pytest.fixture(scope="module")
def release(truths, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    bad_size = coco_truth("ADE_val_00000003")
    no_instance = coco_truth("ADE_val_00000004")
    write_release(root, [*truths.values(), bad_size, no_instance], SPLIT)
    (root / "annotations_instance" / SPLIT / "ADE_val_00000003.png").write_bytes(png_bytes(bad_size.instance[:-8]))
    (root / "annotations_instance" / SPLIT / "ADE_val_00000004.png").unlink()
    return root


@pytest.fixture(scope="module")
def converted(release, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "ade20k"
    outcome = run_conversion("ade20k", str(out), {"root": str(release), "split": SPLIT}, ConvertParams(), num_workers=1)
    return out, outcome.meta


def test_accounting_and_quarantine(converted):
    out, meta = converted
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 4
    assert totals["samples"] == 2 and totals["quarantined"] == 2 and totals["quarantined_parts"] == 3
    assert sorted(read_samples(out)) == [key(s) for s in GOOD]
    rows = read_parquet(open_storage(out), QUARANTINE)
    got = sorted((r["key"], r["level"], r["reason"], r["part_id"]) for r in rows)
    assert got == [
        (key(GOOD[1]), "part", "invalid_annotation", "instance:1"),
        (key(GOOD[1]), "part", "unknown_category", "instance:16"),
        (key(GOOD[1]), "part", "unknown_category", "semantic:200"),
        (key("ADE_val_00000003"), "record", "size_mismatch", ""),
        (key("ADE_val_00000004"), "record", "missing_file", ""),
    ]
    assert meta["task"] == "ovseg" and meta["corpus"] == "ade20k" and meta["splits"] == [SPLIT]
    assert meta["parameters"]["layout"] == "release"


def test_category_table(converted):
    _, meta = converted
    cats = meta["categories"]
    names = class_names()
    mapping = instance_mapping()
    assert [c["id"] for c in cats] == ALL_IDS
    assert [c["name"] for c in cats] == [names[i] for i in ALL_IDS]  # display names, e.g. "building, edifice"
    assert cats[1]["name"] == "building, edifice"
    assert {c["id"]: c["instance_id"] for c in cats if c["isthing"]} == {s: i for i, s in mapping.items()}
    assert sum(c["isthing"] for c in cats) == 100
    assert cats[4] == {"id": 5, "name": "tree", "isthing": False, "instance_id": None}  # csv Stuff=0, yet stuff


@pytest.mark.parametrize("stem", GOOD)
def test_segments_pixel_exact(converted, truths, stem):
    out, _ = converted
    sample, members = read_samples(out)[key(stem)]
    record = sample.record
    truth = truths[stem]
    ref = reference_panoptic(truth)
    names = class_names()
    assert members["jpg"] == truth.image
    assert record.task == "ovseg" and record.source.corpus == "ade20k" and record.source.split == SPLIT
    assert record.source.upstream_ids == {"image_id": stem}
    assert record.source.annotation_file == f"annotations/{SPLIT}/{stem}.png"
    assert (record.image.width, record.image.height, record.image.file_name) == (640, 360, f"{stem}.jpg")

    expected = {c: s for c, s in ref.stuff.items()}  # stuff id = category id
    expected |= {1000 * s.category_id + s.instance.index: s for s in ref.things}  # thing id = 1000 c + G
    assert [s.id for s in record.segments] == sorted(expected)
    union = np.zeros(truth.semantic.shape, int)
    for seg in record.segments:
        want = expected[seg.id]
        mask = masks.decode(seg.rle)
        assert np.array_equal(mask, want.mask), seg.id
        assert (seg.category_id, seg.isthing) == (want.category_id, want.isthing)
        assert seg.category_name == names[want.category_id]
        assert seg.area == want.mask.sum() and seg.bbox == bbox_of(want.mask) and not seg.iscrowd
        assert record.phrases[seg.phrase_index] == seg.category_name
        union += mask
    assert union.max() == 1  # panoptic segments never overlap
    # ignore = semantic "other" (0), plus values outside 1..150
    assert np.array_equal(masks.decode(record.ignore), (truth.semantic == 0) | (truth.semantic > 150))
    if stem == GOOD[0]:
        assert np.array_equal(masks.decode(record.ignore), truth.semantic == 0)
    # one evaluation item listing the 150 classes
    (item,) = sample.items
    assert item.mode == "eval" and len(item.spans) == 150


@pytest.mark.parametrize("stem", GOOD)
def test_semantic_view(converted, truths, stem):
    """The stored record gives back Mask2Former's semantic ground truth (PNG - 1, 0 -> 255).

    `views.semantic_map` (segments, then ignore) equals it on every pixel except the residual ones:
    non-ignored pixels whose semantic class differs from the panoptic class there, i.e. pixels a thing
    instance of another class overrides, and thing-class pixels no instance covers (COCO crowds
    here). There it gives the panoptic class - 1, or 255 where no segment is. `semantic_label_map`
    also paints `meta["semantic_residual"]` and equals it everywhere.
    """
    out, _ = converted
    record: Record = read_samples(out)[key(stem)][0].record
    truth = truths[stem]
    ref = reference_panoptic(truth)
    expected = (truth.semantic.astype(np.int32) - 1).astype(np.uint8)  # 0 -> 255, as annotations_detectron2
    expected[ref.ignore] = 255
    residual = ~ref.ignore & (ref.label != truth.semantic)
    assert residual.sum() > 400  # the crowds and the grown truck (record 1) or dropped instances (record 2)

    view = semantic_map(record, ALL_IDS)
    assert np.array_equal(view[~residual], expected[~residual])
    panoptic_class = np.where(ref.label > 0, ref.label - 1, 255).astype(np.uint8)
    assert np.array_equal(view[residual], panoptic_class[residual])
    assert np.array_equal(semantic_label_map(record), expected)
    stored = {e["category_id"]: masks.decode(e["rle"]) for e in record.meta["semantic_residual"]}
    assert sorted(stored) == sorted(set(truth.semantic[residual].tolist()))
    assert np.array_equal(sum(stored.values()).astype(bool), residual)


@pytest.mark.parametrize("stem", GOOD)
def test_instance_view(converted, truths, stem):
    out, _ = converted
    record = read_samples(out)[key(stem)][0].record
    ref = reference_panoptic(truths[stem])
    things = instance_view(record)
    ids = record.meta["instance_class_ids"]
    assert len(things) == len(ref.things) == len(ids)
    got = {(s.category_id, ids[str(s.id)], masks.decode(s.rle).tobytes()) for s in things}
    want = {(t.category_id, t.instance.instance_class, t.mask.tobytes()) for t in ref.things}
    assert got == want
    if stem == GOOD[1]:
        assert len(ref.things) == 26 - 2  # instances 1 and 16 quarantined


def test_zip_gives_identical_shards(converted, release, ray_session, tmp_path):
    out, _ = converted
    archive = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(release.rglob("*")):
            if path.is_file():
                zf.write(path, f"ADEChallengeData2016/{path.relative_to(release).as_posix()}")
    outcome = run_conversion("ade20k", str(tmp_path / "z"), {"root": str(archive)}, ConvertParams(), num_workers=1)
    assert outcome.meta["totals"] == json.loads((out / "dataset.json").read_text())["totals"]
    shards = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert shards == sorted(p.name for p in (tmp_path / "z" / "shards").glob("*.tar"))
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (tmp_path / "z" / "shards" / name).read_bytes()


def test_plan_identity(release, tmp_path):
    """Folder and zip plan alike; another root (one PNG changed) never passes for this dataset."""
    plan = Ade20k(root=str(release)).plan()
    assert [r.key for r in plan.records] == [key(s) for s in GOOD + ("ADE_val_00000003",)]
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(release.rglob("*")):
            if path.is_file():
                zf.write(path, f"ADEChallengeData2016/{path.relative_to(release).as_posix()}")
    assert Ade20k(root=str(archive)).plan().inputs == plan.inputs
    other = tmp_path / "other"
    write_release(other, [coco_truth(GOOD[0], grow=False)], SPLIT)
    inputs = Ade20k(root=str(other)).plan().inputs
    assert inputs[0].option == "root" and inputs[0].sha256 != plan.inputs[0].sha256
    assert inputs[1:] == plan.inputs[1:]  # the packaged tables


def _write_prepared(root: Path, truths: dict[str, AdeTruth]) -> dict[str, dict[int, tuple[int, np.ndarray]]]:
    """detectron2/X-SAM `ade20k_panoptic_val.json` + PNGs (0-based category ids) from the reference."""
    names = class_names()
    things = set(instance_mapping().values())
    (root / "images").mkdir(parents=True)
    (root / "ade20k_panoptic_val").mkdir()
    doc = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": c - 1, "name": names[c], "isthing": int(c in things)} for c in ALL_IDS
        ],
    }
    expected = {}
    for stem, truth in truths.items():
        ref = reference_panoptic(truth)
        ids = np.zeros(truth.semantic.shape, np.int64)
        segs = {}
        for seg in [*ref.stuff.values(), *ref.things]:
            seg_id = seg.category_id * 256 + (seg.instance.index if seg.instance else 0)
            ids[seg.mask] = seg_id
            segs[seg_id] = (seg.category_id, seg.mask)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        (root / "images" / f"{stem}.jpg").write_bytes(truth.image)
        (root / "ade20k_panoptic_val" / f"{stem}.png").write_bytes(png_bytes(rgb))
        h, w = truth.semantic.shape
        doc["images"].append({"id": stem, "file_name": f"{stem}.jpg", "width": w, "height": h})
        doc["annotations"].append(
            {
                "image_id": stem,
                "file_name": f"{stem}.png",
                "segments_info": [
                    {"id": i, "category_id": c - 1, "area": int(m.sum()), "bbox": list(bbox_of(m)), "iscrowd": 0}
                    for i, (c, m) in segs.items()
                ],
            }
        )
        expected[stem] = segs
    (root / "ade20k_panoptic_val.json").write_text(json.dumps(doc))
    return expected


def test_prepared_layout(truths, ray_session, tmp_path):
    src = tmp_path / "prepared"
    expected = _write_prepared(src, truths)
    inputs = {
        "images": str(src / "images"),
        "annotations": str(src / "ade20k_panoptic_val.json"),
        "masks": str(src / "ade20k_panoptic_val"),
    }
    outcome = run_conversion("ade20k", str(tmp_path / "out"), inputs, ConvertParams(), num_workers=1)
    meta = outcome.meta
    assert meta["totals"]["records_read"] == meta["totals"]["samples"] == 2 and meta["totals"]["quarantined_parts"] == 0
    assert meta["splits"] == [SPLIT] and meta["parameters"]["layout"] == "prepared"
    assert [c["id"] for c in meta["categories"]] == ALL_IDS
    samples = read_samples(tmp_path / "out")
    assert sorted(samples) == [key(s) for s in GOOD]  # the same keys as the release layout
    names = class_names()
    mapping = {s: i for i, s in instance_mapping().items()}
    for stem, segs in expected.items():
        record = samples[key(stem)][0].record
        assert record.task == "ovseg" and record.source.corpus == "ade20k"
        assert record.source.upstream_ids == {"image_id": stem}
        assert [s.id for s in record.segments] == sorted(segs)  # the JSON's segment ids
        covered = np.zeros(truths[stem].semantic.shape, bool)
        for seg in record.segments:
            category, mask = segs[seg.id]
            assert seg.category_id == category and seg.category_name == names[category]  # 1-based, display name
            assert seg.isthing == (category in mapping)
            assert np.array_equal(masks.decode(seg.rle), mask)
            covered |= mask
        assert np.array_equal(masks.decode(record.ignore), ~covered)  # void: no semantic PNG in this layout
        assert record.meta["instance_class_ids"] == {
            str(s.id): mapping[s.category_id] for s in record.segments if s.isthing
        }


def test_input_errors(tmp_path):
    assert get_converter("ade20k") is Ade20k
    for inputs, needle in (
        ({}, "--root"),
        ({"images": "x", "annotations": "y.json"}, "also needs --masks"),
        ({"root": "r", "masks": "m"}, "exclude each other"),
    ):
        with pytest.raises(InputError, match=needle) as err:
            Ade20k(**inputs)
        assert "--annotations ade20k_panoptic_val.json" in str(err.value) and "--root" in str(err.value)
    # a root without images/<split>/
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(InputError, match="images/validation"):
        Ade20k(root=str(tmp_path)).plan()
    # a category table in another order is refused rather than mislabelling every class
    doc = {"images": [], "annotations": [], "categories": [{"id": i, "name": n, "isthing": 0}
                                                            for i, n in enumerate(reversed(class_names().values()))]}
    (tmp_path / "ade20k_panoptic_val.json").write_text(json.dumps(doc))
    conv = Ade20k(images=str(tmp_path), annotations=str(tmp_path / "ade20k_panoptic_val.json"), masks=str(tmp_path))
    with pytest.raises(InputError, match="not ADE20K-150"):
        conv.plan()
