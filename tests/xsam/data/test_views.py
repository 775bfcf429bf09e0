"""Tests of xsam.data.views on the real COCO panoptic sample (val2017 image 439180)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from xsam.data import masks
from xsam.data.schema import Image, Record, Segment, Source, make_key
from xsam.data.views import instance_view, semantic_map, semantic_view

from conftest import CORPORA  # ../shared/corpora, or the shipped copy in examples/corpora

COCO_PANOPTIC = CORPORA / "coco_panoptic"


@pytest.fixture(scope="module")
def panoptic() -> tuple[Record, np.ndarray, dict[int, dict]]:
    """(genseg Record, panoptic id map, category table) of the real COCO panoptic sample."""
    ann_path = COCO_PANOPTIC / "annotations" / "panoptic_val2017.json"
    doc = json.loads(ann_path.read_bytes())
    (info,), (ann,) = doc["images"], doc["annotations"]
    cats = {c["id"]: c for c in doc["categories"]}
    png = PILImage.open(COCO_PANOPTIC / "annotations" / "panoptic_val2017" / ann["file_name"]).convert("RGB")
    rgb = np.asarray(png, dtype=np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]  # panoptic id = R + 256 G + 256^2 B
    segments = [
        Segment(
            id=s["id"],
            rle=masks.encode(ids == s["id"]),
            category_id=s["category_id"],
            category_name=cats[s["category_id"]]["name"],
            isthing=bool(cats[s["category_id"]]["isthing"]),
            iscrowd=bool(s["iscrowd"]),
            bbox=tuple(float(v) for v in s["bbox"]),
            area=float(s["area"]),
        )
        for s in ann["segments_info"]
    ]
    jpg = (COCO_PANOPTIC / "val2017" / info["file_name"]).read_bytes()
    record = Record(
        key=make_key("coco-panoptic", "val2017", info["id"]),
        task="genseg",
        source=Source(
            corpus="coco-panoptic",
            split="val2017",
            upstream_ids={"image_id": info["id"]},
            annotation_file=ann_path.name,
            annotation_sha256=hashlib.sha256(ann_path.read_bytes()).hexdigest(),
        ),
        image=Image(
            ext="jpg",
            sha256=hashlib.sha256(jpg).hexdigest(),
            bytes=len(jpg),
            width=info["width"],
            height=info["height"],
            file_name=info["file_name"],
        ),
        segments=segments,
        ignore=masks.encode(ids == 0),  # void pixels
    )
    return record, ids, cats


def test_semantic_view_is_the_pixel_exact_union(panoptic) -> None:
    record, ids, _ = panoptic
    view = semantic_view(record)
    assert list(view) == sorted({s.category_id for s in record.segments}) == [1, 8, 19, 125, 184, 187, 193]
    for cid, rle in view.items():
        expected = np.zeros((record.image.height, record.image.width), bool)
        for seg in record.segments:
            if seg.category_id == cid:  # crowd included
                expected |= masks.decode(seg.rle)
        assert np.array_equal(masks.decode(rle), expected)
    # and against the PNG itself: person (1) = every pixel whose segment is a person, crowd included
    person_ids = [s.id for s in record.segments if s.category_id == 1]
    assert np.array_equal(masks.decode(view[1]), np.isin(ids, person_ids))


def test_semantic_map_indexes_categories_and_ignores_void(panoptic) -> None:
    record, ids, cats = panoptic
    category_ids = sorted(cats)  # the 133 COCO panoptic categories
    label = semantic_map(record, category_ids)
    assert label.shape == (360, 640) and label.dtype == np.uint8
    assert np.all(label[ids == 0] == 255)
    for seg in record.segments:
        assert np.all(label[ids == seg.id] == category_ids.index(seg.category_id))
    # categories outside the list are unlabelled; a wide ignore value switches to int32
    only_person = semantic_map(record, [1], ignore_value=-1)
    assert only_person.dtype == np.int32
    assert set(np.unique(only_person)) == {-1, 0}
    with pytest.raises(ValueError, match="collides"):
        semantic_map(record, category_ids, ignore_value=0)


def test_instance_view_keeps_things_and_crowd(panoptic) -> None:
    record, _, cats = panoptic
    things = instance_view(record)
    assert things and all(cats[s.category_id]["isthing"] for s in things)
    expected = [s.id for s in record.segments if s.isthing]
    assert [s.id for s in things] == expected and len(expected) == 28
    assert sum(s.iscrowd for s in things) == 2  # crowd kept, flagged, for COCO eval to ignore
    persons = instance_view(record, thing_category_ids={1})
    assert {s.category_id for s in persons} == {1} and len(persons) == 14
    things[0].iscrowd = not things[0].iscrowd  # copies: the record is untouched
    assert record.segments[0].iscrowd is False


def test_instance_view_needs_isthing_or_ids(panoptic) -> None:
    record, _, _ = panoptic
    unknown = record.model_copy(deep=True)
    for seg in unknown.segments:
        seg.isthing = None
    with pytest.raises(ValueError, match="isthing=None"):
        instance_view(unknown)
    assert len(instance_view(unknown, thing_category_ids={1, 8})) == 16
