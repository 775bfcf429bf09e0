"""Mask/label pictures (xsam/model/visualize.py): exact pixel promises on small synthetic images, one real photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsam.model.visualize import (
    PALETTE,
    label_anchor,
    overlay,
    palette_color,
    panoptic_overlay,
    save_png,
    side_by_side,
)

COCO_VAL = Path("/work/shared/corpora/coco_panoptic/val2017")
H, W = 96, 128  # < 200 px, so outlines are 1 px


def noise(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def rect(top: int, left: int, bottom: int, right: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def solid_pixels(picture: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(picture == np.asarray(color), axis=-1)


def extent(hit: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) inclusive of a non-empty boolean map."""
    ys, xs = np.nonzero(hit)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def test_fill_blends_inside_toward_the_palette_colour_and_leaves_outside_exact() -> None:
    image = noise()
    mask = rect(20, 30, 60, 90)
    result = pixels(overlay(image, [mask], [""], alpha=0.5, outline=False))  # "" draws no label box
    original = image.astype(np.int64)
    color = np.asarray(palette_color(0))

    assert result.shape == (H, W, 3)
    np.testing.assert_array_equal(result[~mask], original[~mask])
    expected = np.rint(0.5 * original[mask] + 0.5 * color)
    np.testing.assert_array_equal(result[mask], expected)
    assert np.all(np.abs(result[mask] - color).sum(-1) <= np.abs(original[mask] - color).sum(-1))
    assert np.any(result[mask] != original[mask])


def test_two_masks_get_different_colours() -> None:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    first, second = rect(10, 10, 40, 40), rect(50, 70, 90, 120)
    result = pixels(overlay(image, np.stack([first, second]), ["", ""], alpha=1.0, outline=False))

    assert palette_color(0) != palette_color(1)
    assert np.all(solid_pixels(result, palette_color(0)) == first)
    assert np.all(solid_pixels(result, palette_color(1)) == second)


def test_palette_is_distinct_and_cycles() -> None:
    assert len(set(PALETTE)) == len(PALETTE)
    assert palette_color(len(PALETTE)) == palette_color(0)
    assert palette_color(len(PALETTE) + 3) == palette_color(3)


def test_outline_is_the_solid_colour_on_the_mask_boundary_only() -> None:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    mask = rect(20, 30, 60, 90)
    result = pixels(overlay(image, [mask], [""], alpha=0.5, outline=True))
    solid = solid_pixels(result, palette_color(0))

    boundary = mask & ~rect(21, 31, 59, 89)  # 1 px at this size
    assert np.all(solid == boundary)
    np.testing.assert_array_equal(result[~mask], 128)
    assert not solid[40, 60]  # interior is blended, not solid


def test_label_box_stays_inside_the_image_for_a_mask_at_the_bottom_right_corner() -> None:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    text = "elephant 0.99"  # much wider than the mask
    corner = rect(H - 8, W - 8, H, W)
    centred = rect(44, 60, 52, 68)
    color = palette_color(0)

    corner_box = solid_pixels(pixels(overlay(image, [corner], [text], alpha=0.5, outline=False)), color)
    centred_box = solid_pixels(pixels(overlay(image, [centred], [text], alpha=0.5, outline=False)), color)

    top, left, bottom, right = extent(corner_box)
    assert (bottom, right) == (H - 1, W - 1)  # pushed against the corner...
    c_top, c_left, c_bottom, c_right = extent(centred_box)
    assert (bottom - top, right - left) == (c_bottom - c_top, c_right - c_left)  # ...and not cut
    assert right - left > 8  # the box really is wider than the mask, so it had to move
    x, y = label_anchor(corner)
    assert corner_box[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any()


def test_label_box_is_centred_near_the_anchor_inside_the_mask() -> None:
    # An L-shaped mask: its centroid is outside the mask; the anchor must be a mask pixel.
    mask = rect(10, 10, 80, 30) | rect(60, 10, 80, 110)
    x, y = label_anchor(mask)
    assert mask[y, x]
    ys, xs = np.nonzero(mask)
    distances = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    assert (y - ys.mean()) ** 2 + (x - xs.mean()) ** 2 == distances.min()  # the mask pixel nearest the centroid
    assert label_anchor(np.zeros((H, W), dtype=bool)) is None
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    box = solid_pixels(pixels(overlay(image, [mask], ["L"], alpha=0.5, outline=False)), palette_color(0))
    top, left, bottom, right = extent(box)
    assert top <= y <= bottom and left <= x <= right


def test_score_changes_only_the_label() -> None:
    image = noise()
    mask = rect(30, 20, 70, 100)
    plain = pixels(overlay(image, [mask], ["cat"]))
    scored = pixels(overlay(image, [mask], ["cat"], scores=[0.87]))

    changed = np.any(plain != scored, axis=-1)
    assert changed.any()
    x, y = label_anchor(mask)
    top, left, bottom, right = extent(changed)
    assert top >= y - 15 and bottom <= y + 15  # one text line around the anchor
    assert left >= x - 40 and right <= x + 40
    color = palette_color(0)
    assert solid_pixels(scored, color).sum() > solid_pixels(plain, color).sum()  # "cat 0.87" needs a wider box


def test_text_colour_contrasts_with_the_box() -> None:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    mask = rect(20, 20, 80, 110)
    yellow, navy = PALETTE.index((255, 225, 25)), PALETTE.index((0, 0, 128))
    empty = np.zeros((H, W), dtype=bool)

    def box_pixels(index: int) -> np.ndarray:
        # Empty masks keep their index, so mask `index` gets palette_color(index).
        masks = [empty] * index + [mask]
        result = pixels(overlay(image, masks, ["WWW"] * (index + 1), alpha=0.0, outline=False))
        x, y = label_anchor(mask)
        return result[y - 8 : y + 9, x - 20 : x + 21].reshape(-1, 3)

    assert np.any(np.all(box_pixels(yellow) < 40, axis=-1))  # black text on yellow
    assert np.any(np.all(box_pixels(navy) > 215, axis=-1))  # white text on navy


def test_empty_mask_draws_nothing() -> None:
    image = noise()
    mask = rect(20, 30, 60, 90)
    empty = np.zeros((H, W), dtype=bool)

    with_empty = pixels(overlay(image, [mask, empty], ["dog", "ghost"], scores=[0.5, 0.9]))
    without = pixels(overlay(image, [mask], ["dog"], scores=[0.5]))
    np.testing.assert_array_equal(with_empty, without)
    np.testing.assert_array_equal(pixels(overlay(image, [empty], ["ghost"])), image)
    np.testing.assert_array_equal(pixels(overlay(image, [], [])), image)


def test_panoptic_overlay_colours_each_id_and_leaves_void_unchanged() -> None:
    image = noise(seed=1)
    segmentation = np.zeros((H, W), dtype=np.int32)
    segmentation[10:50, 10:60] = 1
    segmentation[50:90, 60:120] = 2
    segmentation[0:10, 100:128] = 3  # not listed: shown like void
    segments = [(1, "road"), (2, "car")]

    result = pixels(panoptic_overlay(image, segmentation, segments, alpha=1.0, outline=False))
    labelled = np.isin(segmentation, [1, 2])
    # Away from the label boxes each id is its own solid colour; void and unlisted ids are untouched.
    np.testing.assert_array_equal(result[~labelled], image[~labelled])
    assert solid_pixels(result, palette_color(0))[segmentation == 1].mean() > 0.9
    assert solid_pixels(result, palette_color(1))[segmentation == 2].mean() > 0.9
    # Same look as overlay with one mask per listed id.
    masks = [segmentation == 1, segmentation == 2]
    np.testing.assert_array_equal(
        pixels(panoptic_overlay(image, segmentation, segments)), pixels(overlay(image, masks, ["road", "car"]))
    )


def test_side_by_side_size_and_placement() -> None:
    left = Image.fromarray(noise(40, 50, seed=2))
    right = Image.fromarray(noise(60, 70, seed=3))
    panel = side_by_side([left, right], ["ground truth", "prediction"])

    band = panel.height - 60
    assert band > 0
    assert panel.size == (50 + 70, 60 + band)
    result = pixels(panel)
    np.testing.assert_array_equal(result[band : band + 40, :50], pixels(left))
    np.testing.assert_array_equal(result[band:, 50:], pixels(right))
    assert np.any(result[:band] != 255)  # titles were drawn


def test_save_png_round_trips_atomically(tmp_path: Path) -> None:
    image = overlay(noise(), [rect(20, 30, 60, 90)], ["dog"], scores=[0.75])
    target = tmp_path / "nested" / "out.png"

    written = save_png(image, target)
    assert written == target
    with Image.open(target) as reopened:
        assert reopened.format == "PNG"
        np.testing.assert_array_equal(pixels(reopened), pixels(image))
    save_png(Image.new("RGB", (3, 2)), str(target))  # replacing an existing file works too
    with Image.open(target) as reopened:
        assert reopened.size == (3, 2)
    assert [p.name for p in target.parent.iterdir()] == ["out.png"]
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"")
    assert target.stat().st_mode == plain.stat().st_mode  # the umask's usual mode, not a private 0o600 temp file


def test_real_photo(tmp_path: Path) -> None:
    photos = sorted(COCO_VAL.glob("*.jpg"))
    if not photos:
        pytest.skip(f"no COCO val2017 photo under {COCO_VAL}")
    with Image.open(photos[0]) as photo:
        image = np.asarray(photo.convert("RGB"))
    height, width = image.shape[:2]
    mask = rect(height // 4, width // 4, height // 2, width // 2, height, width)

    path = save_png(overlay(image, [mask], ["horse"], scores=[0.91]), tmp_path / "photo.png")
    with Image.open(path) as reopened:
        result = pixels(reopened)
    assert result.shape == image.shape
    np.testing.assert_array_equal(result[~mask], image[~mask])
    assert np.any(result[mask] != image[mask])


def test_accepts_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    image = noise()
    mask = rect(20, 30, 60, 90)
    from_tensors = overlay(torch.from_numpy(image), torch.from_numpy(mask)[None], ["dog"])
    np.testing.assert_array_equal(pixels(from_tensors), pixels(overlay(image, [mask], ["dog"])))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: overlay(noise(), [np.zeros((H, W + 1), bool)], ["a"]), r"masks\[0\] has shape"),
        (lambda: overlay(noise(), [rect(0, 0, 5, 5)], ["a", "b"]), "labels has 2 entries"),
        (lambda: overlay(noise(), [rect(0, 0, 5, 5)], ["a"], scores=[0.1, 0.2]), "scores has 2 entries"),
        (lambda: overlay(noise(), [np.ones((H, W), np.float32)], ["a"]), "threshold"),
        (lambda: overlay(noise(), rect(0, 0, 5, 5), ["a"]), r"mask\[None\]"),
        (lambda: overlay(noise()[..., 0], [rect(0, 0, 5, 5)], ["a"]), r"\[H, W, 3\]"),
        (lambda: overlay(noise().astype(np.float32), [rect(0, 0, 5, 5)], ["a"]), "uint8"),
        (lambda: overlay(noise(), [rect(0, 0, 5, 5)], ["a"], alpha=1.5), "alpha"),
        (lambda: panoptic_overlay(noise(), np.zeros((H + 1, W), np.int32), []), "segmentation has shape"),
        (lambda: panoptic_overlay(noise(), np.zeros((H, W), np.int32), [(0, "void")]), "not positive"),
        (lambda: panoptic_overlay(noise(), np.zeros((H, W), np.int32), [(1, "a"), (1, "b")]), "listed twice"),
        (lambda: side_by_side([Image.new("RGB", (4, 4))], ["a", "b"]), "titles has 2 entries"),
        (lambda: side_by_side([], []), "images is empty"),
    ],
)
def test_bad_input_raises_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
