"""The conversion hot path's shortcuts give exactly what the plain code gives.

- models built without pydantic's validation pass (`schema.checked_model`, `masks.make_rle`,
  `render._seg_target`) are the very instances validation builds, and serialise the same;
- one pycocotools `area` call for many masks equals one call per mask;
- `LabelRuns` hands pycocotools uint32 counts instead of a list: the same RLE;
- `_precomputed_masks` agrees with `polygon_or_rle` wherever it answers, and leaves to it (None)
  every segmentation that `polygon_or_rle` rejects otherwise than for covering no pixel, or on
  which it raises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataprep.converters.coco_instances import _precomputed_masks, polygon_or_rle
from xsam.data import masks
from xsam.data.render import _seg_target
from xsam.data.schema import RLE, SegTarget, Segment, checked_model

CORPORA = Path(__file__).resolve().parents[2] / "examples" / "corpora"


def _state(model) -> tuple:
    return model.__getstate__(), model.model_dump_json(by_alias=True), model.model_dump(mode="json")


def _same(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert list(fast.__dict__) == list(type(slow).model_fields)  # every field, in schema order
    assert _state(fast) == _state(slow)
    assert fast.model_fields_set == slow.model_fields_set
    assert fast == slow


def test_checked_models_equal_validated_ones() -> None:
    rle = RLE(size=(360, 640), counts="abc")
    _same(masks.make_rle(360, 640, "abc"), rle)
    values = {
        "id": 7, "rle": rle, "category_id": 3, "category_name": "person", "isthing": True, "iscrowd": False,
        "bbox": (1.0, 2.5, 3.0, 4.0), "area": 12.0, "phrase_index": 0,
    }
    _same(checked_model(Segment, dict(values)), Segment(**values))
    unnamed = {**values, "category_id": None, "category_name": None, "phrase_index": None, "area": -0.0}
    _same(checked_model(Segment, dict(unnamed)), Segment(**unnamed))
    _same(_seg_target(4, 2), SegTarget(segment=4, span=2))


@pytest.mark.parametrize("args", [(True, 640, "abc"), (360.0, 640, "abc"), (360, 640, b"abc"), (360, 640, 5)])
def test_make_rle_validates_what_it_cannot_take_as_is(args) -> None:
    try:
        expected = RLE(size=(args[0], args[1]), counts=args[2])
    except Exception as err:  # noqa: BLE001
        with pytest.raises(type(err)):
            masks.make_rle(*args)
    else:
        _same(masks.make_rle(*args), expected)


def _real_rles() -> list[RLE]:
    doc = json.loads((CORPORA / "coco_instances" / "annotations" / "panoptic_coco_detection_format.json").read_text())
    return [masks.from_coco(a["segmentation"]) for a in doc["annotations"]]


def test_areas_equal_one_call_per_mask() -> None:
    rles = _real_rles()
    assert masks.areas([masks.to_coco(r) for r in rles]) == [masks.area(r) for r in rles]
    assert masks.areas([]) == []


def test_uint32_counts_equal_list_counts() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 48), (90, 160)]:
        labels = rng.integers(0, 4, size=shape)
        labels[: shape[0] // 2] = 0  # long runs as well as short ones
        for value in range(4):
            mask = labels == value
            expected = masks.encode(mask)
            assert masks.LabelRuns(labels).encode({"m": [value]})["m"] == expected
            counts = [len(list(g)) for g in _runs(mask.ravel(order="F"))]
            h, w = shape
            as_list = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            as_array = mask_utils.frPyObjects({"size": [h, w], "counts": np.array(counts, dtype=np.uint32)}, h, w)
            assert as_list == as_array
            assert as_list["counts"].decode("ascii") == expected.counts


def _runs(flat: np.ndarray):
    """COCO uncompressed runs: zeros first (possibly an empty run), then alternating."""
    current, run = False, []
    for v in flat.tolist():
        if bool(v) != current:
            yield run
            current, run = bool(v), []
        run.append(v)
    yield run


def _segmentations(h: int, w: int) -> list:
    polygons = json.loads((CORPORA / "coco_instances_polygons" / "annotations" / "instances_val2017.json").read_text())
    real = [a["segmentation"] for a in polygons["annotations"]]
    zero = mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))
    some = masks.encode(np.eye(h, w, dtype=bool))
    return [
        *real,
        {"size": [h, w], "counts": some.counts},
        {"size": [h, w], "counts": some.counts.encode("ascii")},
        {"size": [float(h), w], "counts": some.counts},
        {"size": [h, w], "counts": zero["counts"].decode("ascii")},
        {"size": [h, w], "counts": [h * w]},
        {"size": [h, w], "counts": [3, 4, h * w - 7]},
        {"size": [h + 1, w], "counts": some.counts},
        {"size": ["a", w], "counts": some.counts},
        {"size": [h, w], "counts": "\u00e9abc"},
        {"size": [h, w], "counts": 5},
        {"size": [h, w], "counts": b"\xff"},
        {"size": [h, w]},
        [[1, 1, 2, 2]],
        [[5, 5, 5, 5, 5, 5]],
        [[1, 2, "a", 4, 5, 6]],
        [],
        "nope",
        None,
    ]


def test_precomputed_masks_agree_with_polygon_or_rle() -> None:
    h, w = 40, 60
    segs = _segmentations(h, w)
    pre = _precomputed_masks([{"segmentation": s} for s in segs] + [None], h, w)
    assert pre[-1] is None
    answered = 0
    for seg, got in zip(segs, pre):
        try:
            expected = polygon_or_rle(seg, h, w)
        except Exception:  # noqa: BLE001 - polygon_or_rle raises: the caller must run it
            assert got is None
            continue
        if got is None:
            assert expected[0] is None and expected[1] not in ("empty_mask",) and expected[2] != "polygon covers no pixel"
            continue
        answered += 1
        rle, pixels, reason, message = got
        if pixels == 0:
            assert expected == (None, reason, message)
        else:
            assert expected == (rle, None, "") and pixels == masks.area(rle)
    assert answered >= 8
