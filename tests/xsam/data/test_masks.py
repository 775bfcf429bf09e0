"""The RLE codec: lossless round trips, and LabelRuns byte-equal to encoding each mask on its own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools import mask as mask_utils

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


def test_counts_checked_before_decoding():
    """Runs that fall short of H x W would decode from uninitialised memory (pycocotools does not
    check): `counts_problems` finds them, in one pass over many strings, and `decode` refuses them."""
    rng = np.random.default_rng(3)
    good = []
    for _ in range(40):
        mask = rng.random((17, 23)) < rng.random()
        good.append(masks.encode(mask).counts)
    short = mask_utils.frPyObjects({"size": [17, 23], "counts": [5, 7]}, 17, 23)["counts"].decode()
    long = mask_utils.frPyObjects({"size": [17, 23], "counts": [5, 17 * 23]}, 17, 23)["counts"].decode()
    batch = [*good[:20], short, "0 1", "1Y", long, *good[20:], ""]
    got = masks.counts_problems(batch, 17 * 23)
    assert got[:20] == [None] * 20 and got[24:-1] == [None] * 20
    assert got[20] == "RLE runs cover 12 pixels, the mask has 391"
    assert "invalid character ' '" in got[21] and "ends in the middle of a number" in got[22]
    assert got[23] == f"RLE runs cover {5 + 17 * 23} pixels, the mask has 391"
    assert got[-1] == "RLE runs cover 0 pixels, the mask has 391"
    assert got == [masks.counts_problems([c], 17 * 23)[0] for c in batch]  # batching changes nothing
    for counts in good:
        runs = masks.rle_counts(counts)
        assert np.array_equal(np.repeat(np.arange(runs.size) % 2 == 1, runs),
                              masks.decode(masks.make_rle(17, 23, counts)).ravel(order="F"))
    with pytest.raises(ValueError, match="RLE runs cover 12 pixels"):
        masks.decode(masks.make_rle(17, 23, short))
    from xsam.data.builder import _decode_all  # the loader's batch decode: the same refusal

    assert _decode_all([masks.make_rle(17, 23, c) for c in good[:3]], 17, 23).shape == (3, 17, 23)
    with pytest.raises(ValueError, match="RLE runs cover 12 pixels"):
        _decode_all([masks.make_rle(17, 23, good[0]), masks.make_rle(17, 23, short)], 17, 23)
