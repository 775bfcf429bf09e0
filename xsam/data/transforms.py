"""Image and mask preprocessing of a sample: the SigLIP input, the SAM input and its geometry.

X-SAM's `__getitem__` (spec §2.2) feeds one decoded RGB image to two processors:
- SigLIP (§3, vision encoder): resize to 384×384 (aspect ratio not kept), rescale by 1/255,
  normalise with SigLIP's mean/std. The archive pads the image to a square with the mean colour
  (xtuner `expand2square`, centred, fill `int(mean * 255)`) before that resize for evaluation sets,
  not for training (§8): `PreprocessConfig.vision_expand_to_square`.
- SAM (§3, mask encoder): resize the longest side to 1024 (bilinear, new side `int(side * scale +
  0.5)`), rescale, normalise with SAM's ImageNet mean/std, then pad bottom/right with zeros AFTER
  normalisation. The un-padded extent is `scaled_size`.
The arithmetic is that of transformers' PIL-backend processors (`SiglipImageProcessorPil`,
`SamImageProcessorPil`, which is also what X-SAM's copied SAM processor does): a PIL resize on
uint8, then `float32(x * (1/255))`, then `(x - mean) / std` in float32. It is reproduced here with
one 256-entry lookup table per channel, so the outputs are bit-identical to those processors.

Masks follow the image through the same geometry with nearest-neighbour sampling at pixel centres:
output pixel i reads input pixel floor((i + 0.5) · in/out), exactly as PIL `NEAREST`, which X-SAM's
processor uses for `mask_labels` (torch `nearest-exact` is the same rule but may break the rare
exact ties the other way). Padding is False.

Stage 1 (§4) trains with large-scale jitter (LSJ, scale 0.1-2.0, crop 1024), as detectron2's
`ResizeScale` + `FixedSizeCrop` used by Mask2Former: s ~ U(lo, hi); the image is resized by
s·T / max(h, w) (it fits in an sT×sT box); a T×T window is cut at offset round(u · (resized -
T)) per axis with ONE u ~ U(0, 1) shared by both axes (detectron2's choice), when the resized
image is larger than T; the rest is padded bottom/right. No flip (X-SAM's stage 1 sets none).
Both draws come from the caller's `random.Random`, so a sample's jitter is a pure function of its
seed. (X-SAM's own processor centre-crops instead of cropping at random.)

Post-processing (§6, detectron2 `sem_seg_postprocess`) inverts the geometry for predictions:
bilinear upsampling to the canvas, crop to `scaled_size`, bilinear resize to the original size
(`Geometry.restore`).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True, kw_only=True, slots=True)
class PreprocessConfig:
    """How both encoder inputs are made.

    vision_size: SigLIP input side (square). seg_size: SAM input side; the longest image side is
    resized to it and the rest padded. Means/stds are the processors' defaults (SigLIP 0.5/0.5,
    SAM ImageNet). vision_resample: the SigLIP resize filter; `SiglipImageProcessor` defaults to
    bicubic, but the value that counts is `resample` in the checkpoint's preprocessor_config.json.
    vision_expand_to_square: pad to a square with the mean colour before the SigLIP resize (the
    archive does this for evaluation sets only). lsj / lsj_scale: stage-1 large-scale jitter of
    the seg input (see the module docstring); needs an rng in `seg_pixels`.
    """

    vision_size: int = 384
    seg_size: int = 1024
    vision_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vision_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seg_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    seg_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    vision_resample: Literal["bicubic", "bilinear"] = "bicubic"
    vision_expand_to_square: bool = False
    lsj: bool = False
    lsj_scale: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        if self.vision_size < 1 or self.seg_size < 1:
            raise ValueError(
                f"vision_size and seg_size must be positive, got {self.vision_size}, {self.seg_size}"
            )
        for name in ("vision_mean", "vision_std", "seg_mean", "seg_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {getattr(self, name)!r}")
        if min(self.vision_std + self.seg_std) <= 0:
            raise ValueError("vision_std and seg_std must be > 0")
        if self.vision_resample not in _RESAMPLE:
            raise ValueError(
                f"vision_resample must be one of {sorted(_RESAMPLE)}, got {self.vision_resample!r}"
            )
        lo, hi = self.lsj_scale
        if not 0 < lo <= hi:
            raise ValueError(f"lsj_scale must be (lo, hi) with 0 < lo <= hi, got {self.lsj_scale}")


@dataclass(frozen=True, slots=True)
class Geometry:
    """How the seg input was made from the original image (everything needed to map masks both ways)."""

    original_size: tuple[int, int]  # (h, w)
    scale: float  # resize factor applied to the original
    crop: tuple[int, int, int, int]  # (y0, x0, h, w) window of the resized image kept (no crop: whole)
    scaled_size: tuple[int, int]  # (h, w) of the valid (non-padded) region in the seg_size canvas
    seg_size: int

    @property
    def resized_size(self) -> tuple[int, int]:
        """(h, w) of the whole resized image, before the crop."""
        return _resized(self.original_size, self.scale)

    def masks(self, masks: np.ndarray) -> torch.Tensor:
        """[N, H, W] bool masks at the original size -> [N, S, S] bool, aligned with the seg input.

        Nearest sampling at pixel centres, computed only inside the crop window (a gather with
        per-axis source indices, one call per axis for all N masks); False in the padding.
        """
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != self.original_size:
            h, w = self.original_size
            raise ValueError(f"masks must be [N, {h}, {w}] (the original image size), got {masks.shape}")
        (h, w), (rh, rw) = self.original_size, self.resized_size
        y0, x0, ch, cw = self.crop
        rows = _source_index(y0, ch, h, rh)
        cols = _source_index(x0, cw, w, rw)
        out = np.zeros((masks.shape[0], self.seg_size, self.seg_size), dtype=bool)
        window = out[:, :ch, :cw]
        # The column gather is element-wise (the row gather copies whole rows): run it on the fewer
        # rows. mode="clip" (indices are in range anyway) lets np.take write into `out` unbuffered.
        if h < ch:
            np.take(np.take(masks, cols, axis=2), rows, axis=1, out=window, mode="clip")
        else:
            np.take(np.take(masks, rows, axis=1), cols, axis=2, out=window, mode="clip")
        return torch.from_numpy(out)

    def valid(self) -> torch.Tensor:
        """[S, S] bool, True inside scaled_size (the image), False in the padding."""
        out = torch.zeros(self.seg_size, self.seg_size, dtype=torch.bool)
        out[: self.scaled_size[0], : self.scaled_size[1]] = True
        return out

    def restore(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., S', S'] logits on the seg canvas (any resolution) -> [..., H, W] at the original size.

        Bilinear (align_corners=False) upsampling to S, crop to scaled_size, bilinear resize to
        the original size, as Mask2Former + `sem_seg_postprocess` (spec §6). The S×S intermediate
        costs N·S²·4 bytes (200 queries at 1024: 800 MB): restore only the queries that are kept.
        """
        if self.crop != (0, 0, *self.resized_size):
            raise ValueError(
                f"cannot restore predictions to the original image: the seg input is a crop {self.crop} of "
                f"the resized image {self.resized_size} (large-scale jitter); evaluate with lsj=False"
            )
        if logits.ndim < 2 or not logits.is_floating_point():
            raise ValueError(
                f"logits must be a floating tensor [..., S', S'], got {logits.dtype} {tuple(logits.shape)}"
            )
        lead = logits.shape[:-2]
        if logits.numel() == 0:
            return logits.new_zeros(*lead, *self.original_size)
        x = logits.reshape(1, -1, *logits.shape[-2:])
        if x.shape[-2:] != (self.seg_size, self.seg_size):
            x = F.interpolate(x, size=(self.seg_size, self.seg_size), mode="bilinear", align_corners=False)
        x = x[..., : self.scaled_size[0], : self.scaled_size[1]]
        x = F.interpolate(x, size=self.original_size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.original_size)


def decode_image(data: bytes, *, name: str = "") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB, as X-SAM's `Image.open(...).convert("RGB")`.

    Grey, palette, CMYK and alpha images are converted by PIL (alpha is dropped, not composited).
    EXIF orientation is NOT applied: annotations are in stored-pixel order.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {name or '<bytes>'} ({len(data)} bytes): {e}") from e
    return np.array(rgb)  # writable, unlike np.asarray of a PIL image


def vision_pixels(image: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, V, V], SigLIP's input."""
    pil = Image.fromarray(_check_rgb(image))
    if cfg.vision_expand_to_square and pil.width != pil.height:
        side = max(pil.width, pil.height)
        fill = tuple(int(m * 255) for m in cfg.vision_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(pil, ((side - pil.width) // 2, (side - pil.height) // 2))
        pil = square
    resized = pil.resize((cfg.vision_size, cfg.vision_size), _RESAMPLE[cfg.vision_resample])
    out = np.empty((3, cfg.vision_size, cfg.vision_size), dtype=np.float32)
    _normalise_into(out, np.asarray(resized), cfg.vision_mean, cfg.vision_std)
    return torch.from_numpy(out)


def seg_pixels(
    image: np.ndarray, cfg: PreprocessConfig, rng: random.Random | None = None
) -> tuple[torch.Tensor, Geometry]:
    """uint8 [H, W, 3] RGB -> (float32 [3, S, S] SAM input, its Geometry).

    Without LSJ: longest side -> S, zero padding bottom/right. With `cfg.lsj`: large-scale
    jitter drawn from `rng` (two draws: the scale, then the crop fraction).
    """
    image = _check_rgb(image)
    h, w = image.shape[:2]
    s = cfg.seg_size
    if cfg.lsj:
        if rng is None:
            raise ValueError(
                "seg_pixels: cfg.lsj is set, so pass rng=random.Random(seed) (the jitter's only source)"
            )
        scale = rng.uniform(*cfg.lsj_scale) * s / max(h, w)
        u = rng.random()
    else:
        scale, u = s / max(h, w), 0.0
    rh, rw = _resized((h, w), scale)
    ch, cw = min(rh, s), min(rw, s)
    y0, x0 = round((rh - ch) * u), round((rw - cw) * u)
    geometry = Geometry((h, w), scale, (y0, x0, ch, cw), (ch, cw), s)
    # Resize only the kept window (PIL's `box`): resize-then-crop up to PIL's fixed-point filter
    # rounding (<= 2 grey levels on a few % of pixels), ~3x cheaper than a 2x-sized image at s = 2.
    box = (x0 * w / rw, y0 * h / rh, (x0 + cw) * w / rw, (y0 + ch) * h / rh)
    resized = np.asarray(Image.fromarray(image).resize((cw, ch), Image.Resampling.BILINEAR, box=box))
    out = np.zeros((3, s, s), dtype=np.float32)
    _normalise_into(out[:, :ch, :cw], resized, cfg.seg_mean, cfg.seg_std)
    return torch.from_numpy(out), geometry


def _resized(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The resized (h, w): SAM's `int(side * scale + 0.5)`, at least 1 pixel."""
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def _source_index(start: int, length: int, size: int, resized: int) -> np.ndarray:
    """Input pixels read by output pixels start..start+length of a `size` -> `resized` PIL NEAREST resize.

    Pillow (`ImagingScaleAffine`) starts at half a step and adds the float64 step once per output
    pixel, then truncates; a sequential cumsum repeats that sum exactly, so ties between two input
    pixels break the same way as in X-SAM's processor.
    """
    step = size / resized
    pos = np.cumsum(np.concatenate(([step * 0.5], np.full(start + length - 1, step))))[start:]
    return np.minimum(pos.astype(np.int64), size - 1)


def _normalise_into(
    out: np.ndarray, image: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    """out[c] = (float32(x * (1/255)) - mean[c]) / std[c], via a per-channel lookup table.

    The table is computed with the processors' own float64-rescale then float32-normalise steps,
    so the result is bit-identical to them and costs one gather per pixel.
    """
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    for c in range(3):
        lut = (values - np.float32(mean[c])) / np.float32(std[c])
        np.take(lut, image[..., c], out=out[c], mode="clip")


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a non-empty uint8 [H, W, 3] RGB array, got {image.dtype} {image.shape}"
        )
    return image
