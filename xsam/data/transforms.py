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

    def source_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Per canvas row / column of the window, the original pixel it reads (nearest)."""
        (h, w), (rh, rw) = self.original_size, self.resized_size
        y0, x0, ch, cw = self.crop
        return _source_index(y0, ch, h, rh), _source_index(x0, cw, w, rw)

    def pack(self, masks: np.ndarray) -> MaskStack:
        """[N, H, W] bool masks at the original size -> a compact `MaskStack` whose `dense()`
        equals `masks()` (bits at the original resolution + the index maps: ~30x fewer bytes
        to ship from a loader worker, and the resampling runs where the tensors are used)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != self.original_size:
            h, w = self.original_size
            raise ValueError(f"masks must be [N, {h}, {w}] (the original image size), got {masks.shape}")
        rows, cols = self.source_indices()
        return MaskStack(bits=np.packbits(masks, axis=2), width=masks.shape[2], rows=rows, cols=cols, seg_size=self.seg_size)

    def masks(self, masks: np.ndarray) -> torch.Tensor:
        """[N, H, W] bool masks at the original size -> [N, S, S] bool, aligned with the seg input:
        nearest sampling at pixel centres, False in the padding (`pack(masks).dense()`)."""
        return self.pack(masks).dense()

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


@dataclass(frozen=True, slots=True)
class MaskStack:
    """N binary masks on the seg canvas, stored compactly: bit-packed at the image's original
    resolution (`np.packbits` along the width) with the per-axis source indices of the canvas
    window (`Geometry.source_indices`). `dense(device)` makes the [N, S, S] bool tensor there,
    the same as `Geometry.masks`. numpy, not torch: a dataloader worker hands numpy arrays to
    the main process by value through its pipe, where each torch tensor would cost a
    shared-memory segment of its own."""

    bits: np.ndarray  # uint8 [N, H, ceil(W / 8)]
    width: int  # W
    rows: np.ndarray  # int64 [window h]: source row of each canvas row
    cols: np.ndarray  # int64 [window w]: source column of each canvas column
    seg_size: int

    def __len__(self) -> int:
        return int(self.bits.shape[0])

    def select(self, index: list[int]) -> MaskStack:
        """The stack of masks `index` (in that order)."""
        picked = self.bits[np.asarray(index, dtype=np.int64)] if index else self.bits[:0]
        return MaskStack(bits=picked, width=self.width, rows=self.rows, cols=self.cols, seg_size=self.seg_size)

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N, S, S] bool on `device`: copy the bits there, unpack, gather the window, pad with False."""
        n, s = len(self), self.seg_size
        out = torch.zeros((n, s, s), dtype=torch.bool, device=device)
        if n == 0:
            return out
        rows = torch.from_numpy(self.rows).to(device)
        cols = torch.from_numpy(self.cols).to(device)
        bits = torch.from_numpy(self.bits).to(device).index_select(1, rows)  # only the rows the window reads
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
        unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(n, len(rows), -1)[:, :, : self.width]
        out[:, : len(rows), : len(cols)] = unpacked.index_select(2, cols).bool()
        return out


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


def normalize(images: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32, (float32(x * (1/255)) - mean) / std per channel.

    A gather from the same 256-entry tables `vision_pixels`/`seg_pixels` use, so the result is
    bit-identical on any device: loaders ship uint8 images (4x fewer bytes) and normalise here,
    where the batch lands (as timm's GPU prefetcher does).
    """
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be uint8 [..., 3, H, W], got {images.dtype} {tuple(images.shape)}")
    lut = torch.from_numpy(np.stack([_lut(mean[c], std[c]) for c in range(3)])).to(images.device)
    offset = (torch.arange(3, device=images.device) * 256).view(3, 1, 1)
    return lut.reshape(-1)[images.long() + offset]


def vision_image(image: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> uint8 [3, V, V]: SigLIP's input before normalisation."""
    return torch.from_numpy(np.ascontiguousarray(vision_resized(image, cfg).transpose(2, 0, 1)))


def vision_resized(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [V, V, 3]: the resized (and squared) image, what a loader ships."""
    pil = Image.fromarray(_check_rgb(image))
    if cfg.vision_expand_to_square and pil.width != pil.height:
        side = max(pil.width, pil.height)
        fill = tuple(int(m * 255) for m in cfg.vision_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(pil, ((side - pil.width) // 2, (side - pil.height) // 2))
        pil = square
    return np.asarray(pil.resize((cfg.vision_size, cfg.vision_size), _RESAMPLE[cfg.vision_resample]))


def vision_pixels(image: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, V, V], SigLIP's input."""
    return normalize(vision_image(image, cfg), cfg.vision_mean, cfg.vision_std)


def seg_pixels(
    image: np.ndarray, cfg: PreprocessConfig, rng: random.Random | None = None
) -> tuple[torch.Tensor, Geometry]:
    """uint8 [H, W, 3] RGB -> (float32 [3, S, S] SAM input, its Geometry).

    Without LSJ: longest side -> S, zero padding bottom/right. With `cfg.lsj`: large-scale
    jitter drawn from `rng` (two draws: the scale, then the crop fraction).
    """
    canvas, geometry = seg_image(image, cfg, rng)
    return normalize_seg(canvas, geometry.scaled_size, cfg), geometry


def normalize_seg(canvas: torch.Tensor, scaled_size: tuple[int, int], cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [3, S, S] seg canvas -> float32 SAM input: normalised inside `scaled_size`, zero
    outside (SAM pads AFTER normalisation)."""
    out = torch.zeros(canvas.shape, dtype=torch.float32, device=canvas.device)
    h, w = scaled_size
    out[:, :h, :w] = normalize(canvas[:, :h, :w], cfg.seg_mean, cfg.seg_std)
    return out


def seg_image(
    image: np.ndarray, cfg: PreprocessConfig, rng: random.Random | None = None
) -> tuple[torch.Tensor, Geometry]:
    """uint8 [H, W, 3] RGB -> (uint8 [3, S, S] canvas, its Geometry): the SAM input before
    normalisation; the resized window at the top left, zeros elsewhere (see `seg_pixels`)."""
    window, geometry = seg_window(image, cfg, rng)
    h, w = geometry.scaled_size
    out = np.zeros((3, cfg.seg_size, cfg.seg_size), dtype=np.uint8)
    out[:, :h, :w] = window.transpose(2, 0, 1)
    return torch.from_numpy(out), geometry


def seg_window(
    image: np.ndarray, cfg: PreprocessConfig, rng: random.Random | None = None
) -> tuple[np.ndarray, Geometry]:
    """uint8 [H, W, 3] RGB -> (uint8 [h, w, 3] resized window, its Geometry): only the valid part
    of the SAM canvas (`scaled_size`), what a loader ships; the padding is added where it lands."""
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
    return np.asarray(Image.fromarray(image).resize((cw, ch), Image.Resampling.BILINEAR, box=box)), geometry


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


def _lut(mean: float, std: float) -> np.ndarray:
    """The 256 normalised values of one channel: (float32(x * (1/255)) - mean) / std.

    Computed with the processors' own float64-rescale then float32-normalise steps, so a gather
    from it is bit-identical to them and costs one lookup per pixel.
    """
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (values - np.float32(mean)) / np.float32(std)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a non-empty uint8 [H, W, 3] RGB array, got {image.dtype} {image.shape}"
        )
    return image
