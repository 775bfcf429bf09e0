"""Preprocessing: parity with the upstream processors, mask/image alignment, LSJ determinism, restore."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CORPORA
from PIL import Image
from transformers import SamImageProcessorPil, SiglipImageProcessorPil

from xsam.data import masks as rle
from xsam.data.transforms import Geometry, PreprocessConfig, decode_image, seg_pixels, vision_pixels

COCO_JPEG = CORPORA / "coco_panoptic" / "val2017" / "000000439180.jpg"
COCO_RLES = CORPORA / "coco_instances" / "annotations" / "panoptic_coco_detection_format.json"
S = 1024


@pytest.fixture(scope="module")
def coco_image() -> np.ndarray:
    return decode_image(COCO_JPEG.read_bytes(), name=COCO_JPEG.name)


@pytest.fixture(scope="module")
def coco_masks() -> np.ndarray:
    annotations = json.loads(COCO_RLES.read_text())["annotations"]
    return np.stack([rle.decode(a["segmentation"]) for a in annotations])


# ------------------------------------------------------------------------ parity with upstream


def test_vision_pixels_match_siglip_processor(coco_image):
    """Bit-identical to transformers' SigLIP processor, PIL backend.

    Without torchvision (as here) `SiglipImageProcessor()` IS `SiglipImageProcessorPil`; naming the
    PIL class keeps the reference fixed if torchvision is installed later (its tensor resize differs
    by a few grey levels), and the PIL path is what X-SAM's transformers 4.x ran. The class default
    size is 224 px; X-SAM's checkpoint uses 384, so only `size` is set.
    Measured max |diff| = 0.0: same PIL bicubic resize on uint8, and the lookup table holds the
    processor's own float64-rescale/float32-normalise values. 1e-6 leaves room for a libm change.
    """
    ours = vision_pixels(coco_image, PreprocessConfig())
    ref = SiglipImageProcessorPil(size={"height": 384, "width": 384})(coco_image, return_tensors="pt")
    assert ours.dtype == torch.float32 and ours.shape == (3, 384, 384)
    assert (ours - ref["pixel_values"][0]).abs().max().item() <= 1e-6


def test_vision_expand_to_square_pads_with_mean_colour_centred(coco_image):
    """xtuner's expand2square: centred paste on a square of int(mean * 255), then the processor."""
    h, w = coco_image.shape[:2]
    square = Image.new("RGB", (w, w), (127, 127, 127))
    square.paste(Image.fromarray(coco_image), (0, (w - h) // 2))
    ours = vision_pixels(coco_image, PreprocessConfig(vision_expand_to_square=True))
    ref = SiglipImageProcessorPil(size={"height": 384, "width": 384})(square, return_tensors="pt")
    assert (ours - ref["pixel_values"][0]).abs().max().item() <= 1e-6
    assert not torch.equal(ours, vision_pixels(coco_image, PreprocessConfig()))


def test_seg_pixels_match_sam_processor(coco_image):
    """Bit-identical to SamImageProcessor (default arguments); measured max |diff| = 0.0 (see above)."""
    ours, geo = seg_pixels(coco_image, PreprocessConfig())
    ref = SamImageProcessorPil()(coco_image, return_tensors="pt")
    assert ours.dtype == torch.float32 and ours.shape == (3, S, S)
    assert (ours - ref["pixel_values"][0]).abs().max().item() <= 1e-6
    assert geo.scaled_size == tuple(ref["reshaped_input_sizes"][0].tolist()) == (576, 1024)
    assert geo.original_size == (360, 640) and geo.crop == (0, 0, 576, 1024)
    assert not ours[:, 576:].any()  # zero padding after normalisation, bottom/right


def test_lsj_window_equals_resize_then_crop():
    """The LSJ seg input is the crop of the whole resized image (PIL's box resize only rounds differently)."""
    image = np.random.default_rng(0).integers(0, 256, (333, 517, 3), dtype=np.uint8)
    cfg = PreprocessConfig(lsj=True, lsj_scale=(2.5, 2.5))
    ours, geo = seg_pixels(image, cfg, random.Random(3))
    (rh, rw), (y0, x0, ch, cw) = geo.resized_size, geo.crop
    assert (ch, cw) == (S, S) and (y0, x0) != (0, 0)
    full = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR))
    full = full[y0 : y0 + ch, x0 : x0 + cw]
    mean, std = np.array(cfg.seg_mean, np.float32), np.array(cfg.seg_std, np.float32)
    ref = torch.from_numpy(((full / np.float32(255) - mean) / std).transpose(2, 0, 1))
    diff = (ours - ref).abs()
    # PIL's fixed-point filter taps differ at most by 2 grey levels on a few pixels.
    assert diff.max().item() <= 2.5 / 255 / min(cfg.seg_std)
    assert (diff > 1e-5).float().mean().item() < 0.05


# ----------------------------------------------------------------------------- mask alignment


def _painted_rectangle(h: int = 300, w: int = 400) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), 40, dtype=np.uint8)
    mask = np.zeros((1, h, w), dtype=bool)
    mask[0, 70:230, 90:330] = True
    image[mask[0]] = (250, 20, 20)
    return image, mask


def _iou_away_from_edges(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IoU ignoring the 1-pixel band on both sides of the target's boundary (resampling blur)."""
    t = target.float()[None, None]
    dilated = F.max_pool2d(t, 3, 1, 1)[0, 0] > 0
    eroded = -F.max_pool2d(-t, 3, 1, 1)[0, 0] > 0
    keep = ~(dilated & ~eroded)
    p, q = pred & keep, target & keep
    return (p & q).sum().item() / max(1, (p | q).sum().item())


@pytest.mark.parametrize("lsj", [False, True])
def test_masks_stay_aligned_with_the_image(lsj):
    image, mask = _painted_rectangle()
    cfg = PreprocessConfig(lsj=lsj)
    red_threshold = ((145 / 255) - cfg.seg_mean[0]) / cfg.seg_std[0]  # halfway between 40 and 250
    geometries = []
    for seed in range(8) if lsj else [None]:
        pixels, geo = seg_pixels(image, cfg, random.Random(seed) if lsj else None)
        target = geo.masks(mask)[0]
        painted = (pixels[0] > red_threshold) & geo.valid()
        assert target.any(), f"seed {seed}: rectangle outside the crop {geo}"
        assert not (target & ~geo.valid()).any()
        assert _iou_away_from_edges(painted, target) > 0.9, f"seed {seed}: {geo}"
        geometries.append(geo)
    if lsj:  # the seeds cover a shrink (whole image, padded) and an enlargement cropped off-origin
        assert any(g.resized_size[0] < S and g.resized_size[1] < S for g in geometries)
        assert any(g.crop[:2] != (0, 0) and g.crop[2:] == (S, S) for g in geometries)


@pytest.mark.parametrize("scale", [None, 0.1, 0.7, 2.0])
def test_masks_are_pil_nearest_resize_then_crop_then_pad(coco_masks, scale):
    """The mask rule is nearest at pixel centres, bit-exact with PIL NEAREST (X-SAM's mask resize)."""
    subset = coco_masks[::4]
    h, w = subset.shape[1:]
    cfg = PreprocessConfig(lsj=scale is not None, lsj_scale=(scale or 1.0, scale or 1.0))
    _, geo = seg_pixels(np.zeros((h, w, 3), np.uint8), cfg, random.Random(5))
    (rh, rw), (y0, x0, ch, cw) = geo.resized_size, geo.crop
    ours = geo.masks(subset)
    assert ours.dtype == torch.bool and ours.shape == (len(subset), S, S)
    for got, m in zip(ours, subset, strict=True):
        ref = np.asarray(Image.fromarray(m).resize((rw, rh), Image.Resampling.NEAREST))
        ref = ref[y0 : y0 + ch, x0 : x0 + cw]
        assert np.array_equal(got[:ch, :cw].numpy(), ref)
        assert not got[ch:].any() and not got[:, cw:].any()


def test_masks_accept_none_and_reject_wrong_size():
    _, geo = seg_pixels(np.zeros((48, 64, 3), np.uint8), PreprocessConfig())
    assert geo.masks(np.zeros((0, 48, 64), bool)).shape == (0, S, S)
    with pytest.raises(ValueError, match=r"\[N, 48, 64\]"):
        geo.masks(np.zeros((2, 64, 48), bool))


def test_valid_marks_scaled_size():
    _, geo = seg_pixels(np.zeros((48, 64, 3), np.uint8), PreprocessConfig())
    assert geo.scaled_size == (768, 1024)
    valid = geo.valid()
    assert valid.shape == (S, S) and valid.sum().item() == 768 * 1024
    assert valid[767, 1023] and not valid[768, 0]


# ------------------------------------------------------------------------------ LSJ randomness


def test_lsj_is_a_pure_function_of_the_rng(coco_image, coco_masks):
    cfg = PreprocessConfig(lsj=True)
    a, geo_a = seg_pixels(coco_image, cfg, random.Random(7))
    b, geo_b = seg_pixels(coco_image, cfg, random.Random(7))
    assert geo_a == geo_b and torch.equal(a, b)
    assert torch.equal(geo_a.masks(coco_masks), geo_b.masks(coco_masks))
    geometries = {seg_pixels(coco_image, cfg, random.Random(seed))[1] for seed in range(8)}
    assert len(geometries) == 8
    lo, hi = cfg.lsj_scale
    for geo in geometries:
        assert lo * S <= geo.scale * max(geo.original_size) <= hi * S


def test_lsj_needs_an_rng(coco_image):
    with pytest.raises(ValueError, match="rng"):
        seg_pixels(coco_image, PreprocessConfig(lsj=True))


# ------------------------------------------------------------------------------------ restore


@pytest.mark.parametrize("resolution", [S, S // 4])
def test_restore_round_trips_real_masks(coco_masks, resolution):
    """RLE -> seg canvas -> (model-resolution logits) -> restore -> > 0.5 gives back the mask."""
    _, geo = seg_pixels(np.zeros((*coco_masks.shape[1:], 3), np.uint8), PreprocessConfig())
    canvas = geo.masks(coco_masks).float()
    if resolution != S:
        canvas = F.interpolate(canvas[None], size=(resolution, resolution), mode="area")[0]
    restored = geo.restore(canvas) > 0.5
    assert restored.shape == coco_masks.shape
    target = torch.from_numpy(coco_masks)
    iou = (restored & target).sum((1, 2)) / (restored | target).sum((1, 2))
    # Measured: min IoU 1.0 at full resolution; at 1/4, >= 0.971 for masks of >= 2000 px, 0.896 for
    # the smallest (a 96-pixel fragment is a few cells of a 256² logit map), so those are not checked.
    checked = iou if resolution == S else iou[target.sum((1, 2)) >= 2000]
    assert (checked > 0.95).all(), iou


def test_restore_keeps_leading_dims_and_handles_no_queries():
    _, geo = seg_pixels(np.zeros((30, 40, 3), np.uint8), PreprocessConfig(seg_size=64))
    assert geo.restore(torch.zeros(2, 3, 16, 16)).shape == (2, 3, 30, 40)
    assert geo.restore(torch.zeros(0, 16, 16)).shape == (0, 30, 40)
    with pytest.raises(ValueError, match="floating"):
        geo.restore(torch.zeros(1, 16, 16, dtype=torch.int64))


def test_restore_refuses_a_cropped_geometry():
    cropped = Geometry((100, 100), 20.48, (5, 5, 1024, 1024), (1024, 1024), S)
    with pytest.raises(ValueError, match="crop"):
        cropped.restore(torch.zeros(1, S, S))
    shrunk = Geometry((100, 100), 5.0, (0, 0, 500, 500), (500, 500), S)  # LSJ without a crop is fine
    assert shrunk.restore(torch.zeros(1, 256, 256)).shape == (1, 100, 100)


# ------------------------------------------------------------------------------ decode, config


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")]
)
def test_decode_image_converts_to_rgb(mode, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 30, 60)).convert(mode).save(buffer, fmt)
    image = decode_image(buffer.getvalue(), name=f"x.{fmt.lower()}")
    assert image.dtype == np.uint8 and image.shape == (10, 12, 3) and image.flags.writeable
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("data", [b"", b"not an image", COCO_JPEG.read_bytes()[:5000]])
def test_decode_image_names_the_undecodable(data):
    with pytest.raises(ValueError, match="broken.jpg"):
        decode_image(data, name="broken.jpg")


def test_inputs_and_config_are_validated():
    with pytest.raises(ValueError, match="uint8"):
        vision_pixels(np.zeros((4, 4, 3), np.float32), PreprocessConfig())
    with pytest.raises(ValueError, match="RGB"):
        seg_pixels(np.zeros((4, 4), np.uint8), PreprocessConfig())
    for bad in ({"lsj_scale": (2.0, 0.1)}, {"seg_std": (0.2, 0.0, 0.2)}, {"vision_mean": (0.5,)},
                {"seg_size": 0}, {"vision_resample": "lanczos"}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreprocessConfig().lsj = True  # type: ignore[misc]


def _nearest_reference(geometry, masks: np.ndarray) -> torch.Tensor:
    """Independent of MaskStack: gather the window's source rows and columns with numpy."""
    rows, cols = geometry.source_indices()
    out = np.zeros((masks.shape[0], geometry.seg_size, geometry.seg_size), dtype=bool)
    out[:, : len(rows), : len(cols)] = masks[:, rows][:, :, cols]
    return torch.from_numpy(out)


@pytest.mark.parametrize("lsj_seed", [None, 0, 3, 5])
def test_packed_masks_equal_the_dense_ones(lsj_seed):
    """What the loader ships (MaskStack: bits at the original size + index maps) expands to exactly
    the masks `Geometry.masks` makes, with and without jitter."""
    from xsam.data.transforms import MaskStack

    rs = np.random.RandomState(1)
    image = rs.randint(0, 256, (45, 83, 3)).astype(np.uint8)
    masks = rs.rand(5, 45, 83) > 0.6
    cfg = PreprocessConfig(vision_size=16, seg_size=64, lsj=lsj_seed is not None)
    rng = random.Random(lsj_seed) if lsj_seed is not None else None
    _, geometry = seg_pixels(image, cfg, rng)
    stack = geometry.pack(masks)
    assert isinstance(stack, MaskStack) and len(stack) == 5
    assert stack.bits.dtype == np.uint8 and stack.bits.shape == (5, 45, 11)
    assert torch.equal(stack.dense(), _nearest_reference(geometry, masks))
    assert torch.equal(stack.select([4, 1]).dense(), _nearest_reference(geometry, masks[[4, 1]]))
    assert geometry.pack(masks[:0]).dense().shape == (0, 64, 64)


def test_normalize_in_batches_equals_the_per_sample_inputs():
    from xsam.data.transforms import normalize, normalize_seg, seg_image, vision_image

    rs = np.random.RandomState(2)
    cfg = PreprocessConfig(vision_size=24, seg_size=40)
    images = [rs.randint(0, 256, (31, 17, 3)).astype(np.uint8), rs.randint(0, 256, (12, 40, 3)).astype(np.uint8)]
    stacked = torch.stack([vision_image(im, cfg) for im in images])
    assert stacked.dtype == torch.uint8
    batch = normalize(stacked, cfg.vision_mean, cfg.vision_std)
    for b, im in enumerate(images):
        assert torch.equal(batch[b], vision_pixels(im, cfg))
        canvas, geometry = seg_image(im, cfg)
        assert torch.equal(normalize_seg(canvas, geometry.scaled_size, cfg), seg_pixels(im, cfg)[0])
