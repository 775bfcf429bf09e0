"""The RLE codec: lossless round trips, and LabelRuns byte-equal to encoding each mask on its own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage

from xsam.data import masks


def _per_mask(labels: np.ndarray, groups: dict) -> dict:
    return {name: masks.encode(np.isin(labels, values)) for name, values in groups.items()}


def test_label_runs_equal_per_mask_encoding_on_the_real_panoptic_png(corpora):
    png = corpora / "coco_panoptic" / "annotations" / "panoptic_val2017" / "000000439180.png"
    rgb = np.asarray(PILImage.open(png).convert("RGB")).astype(np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    values = sorted(np.unique(ids).tolist())
    groups = {v: [v] for v in values} | {"void+two": [0, values[3], values[5]], "all": values, "none": [7], "empty": []}
    runs = masks.LabelRuns(ids)
    assert runs.labels() == set(values)
    assert runs.encode(groups) == _per_mask(ids, groups)


@pytest.mark.parametrize("seed", range(20))
def test_label_runs_equal_per_mask_encoding_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    labels = rng.integers(0, 4, size=(h, w)) * (rng.random((h, w)) < 0.7)
    groups = {0: [0], 1: [1], 2: [2], 3: [3], "12": [1, 2], "0123": [0, 1, 2, 3], "9": [9]}
    assert masks.LabelRuns(labels).encode(groups) == _per_mask(labels, groups)
    for value in range(4):
        assert np.array_equal(masks.decode(masks.LabelRuns(labels).encode({0: [value]})[0]), labels == value)


def test_encode_decode_round_trip_and_coco_forms():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:8] = True
    rle = masks.encode(mask)
    assert np.array_equal(masks.decode(rle), mask)
    assert masks.area(rle) == 15 and masks.bbox(rle) == (3.0, 2.0, 5.0, 3.0)
    uncompressed = {"size": [7, 9], "counts": [0, 63]}  # COCO crowd form: all ones
    assert masks.area(masks.from_coco(uncompressed)) == 63
    assert masks.union([rle, masks.from_coco(uncompressed)], 7, 9) == masks.from_coco(uncompressed)
