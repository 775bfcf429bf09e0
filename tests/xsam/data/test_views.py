"""Tests of xsam.data.views on the real COCO panoptic sample (val2017 image 439180)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import panoptic_sample_record
from conftest import (
    CORPORA,  # ../shared/corpora, or the shipped copy in examples/corpora
)

from xsam.data import masks
from xsam.data.schema import Record
from xsam.data.views import instance_view, semantic_map, semantic_view

COCO_PANOPTIC = CORPORA / "coco_panoptic"


@pytest.fixture(scope="module")
def panoptic() -> tuple[Record, np.ndarray, dict[int, dict]]:
    """(genseg Record, panoptic id map, category table) of the real COCO panoptic sample."""
    record, ids, doc = panoptic_sample_record(CORPORA)
    cats = {c["id"]: c for c in doc["categories"]}
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


def test_semantic_map_reproduces_coco_panoptic_semseg(panoptic) -> None:
    """COCO's panoptic_semseg ground truth, computed here as Mask2Former's preparation script does
    (255 everywhere, then every listed segment, crowd included, gets its category's list index)."""
    record, ids, cats = panoptic
    category_ids = list(cats)  # the categories in the panoptic JSON's list order
    reference = np.full(ids.shape, 255, np.uint8)
    for seg in record.segments:
        reference[ids == seg.id] = category_ids.index(seg.category_id)
    assert any(seg.iscrowd for seg in record.segments)
    assert np.array_equal(semantic_map(record, category_ids, apply_ignore=False), reference)
    crowd = np.isin(ids, [seg.id for seg in record.segments if seg.iscrowd])
    # a converted COCO panoptic record's ignore is void + crowd (dataprep.converters.coco_panoptic)
    record = record.model_copy(update={"ignore": masks.encode((ids == 0) | crowd)})
    assert np.array_equal(semantic_map(record, category_ids, apply_ignore=False), reference)
    default = semantic_map(record, category_ids)  # honours record.ignore: crowd pixels ignored
    assert np.all(default[crowd] == 255) and np.array_equal(default[~crowd], reference[~crowd])


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
