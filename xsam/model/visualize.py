"""Pictures of segmentation outputs: masks and labels drawn over the image, for `xsam predict` and logged figures.

- `overlay`: N binary masks (instance, referring, grounded outputs of `postprocess`), each alpha-blended in its own
  palette colour, outlined in the solid colour, and labelled ("person 0.87") on a box of that colour.
- `panoptic_overlay`: the same look for a panoptic id map (`PanopticResult.segmentation`, 0 = void).
- `side_by_side`: titled panels in one row ("ground truth | prediction").
- `save_png`: atomic PNG write (temporary file in the target directory, then `os.replace`).

The look follows detectron2's `Visualizer.overlay_instances` (detectron2/utils/visualizer.py): translucent fill,
solid outline, label text on a coloured box near the mask; it is written here with numpy and PIL only (no
matplotlib, no OpenCV). Pixels outside every mask are left exactly as they were, so an overlay can be diffed
against its input.

Colours are fixed by position: mask i (or the i-th listed panoptic segment) gets `PALETTE[i % len(PALETTE)]`, so the
same index has the same colour in every picture (a prediction and its ground truth drawn in the same order match).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]

# Sasha Trubetskoy's "20 simple, distinct colors" (sashamaps.net/docs/resources/20-colors), minus white, black,
# grey and the three pastels that vanish when blended over bright photos. Adjacent entries differ in hue, so the
# first few masks (the usual case) are easy to tell apart.
PALETTE: tuple[Color, ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (250, 190, 212),  # pink
    (170, 110, 40),  # brown
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (0, 0, 128),  # navy
)

_TITLE_BACKGROUND: Color = (255, 255, 255)
_TITLE_TEXT: Color = (0, 0, 0)


def palette_color(index: int) -> Color:
    """The colour of mask `index` (cycles through `PALETTE` when there are more masks than colours)."""
    return PALETTE[index % len(PALETTE)]


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str],
    *,
    scores: Sequence[float] | None = None,
    alpha: float = 0.5,
    outline: bool = True,
) -> Image.Image:
    """Draw binary masks over an image, each in its own colour with a label.

    Args:
        image: [H, W, 3] uint8 RGB (a PIL RGB image or a CPU tensor also works: anything `np.asarray` turns into
            that).
        masks: N masks of [H, W], as a sequence or one [N, H, W] array; bool, or integers where nonzero means
            inside. Float masks are refused: threshold them first (probabilities > 0.5 would otherwise all be on).
        labels: N label texts, one per mask; an empty text draws the mask without a label box.
        scores: optional N scores, shown after the label with two decimals ("person 0.87").
        alpha: opacity of the colour fill, in [0, 1]; 0 leaves the image visible, 1 paints the mask solid.
        outline: draw the inner boundary of each mask (1 px, 2 px from 200 px images up) in the solid colour.

    Returns an RGB image of the same size. Masks are painted in order, so a later mask covers an earlier one where
    they overlap; every label is drawn after all masks. An empty mask is skipped (no fill, no label) but keeps its
    index, so the colours of the other masks do not shift.
    """
    pixels = _check_image(image)
    height, width = pixels.shape[:2]
    mask_list = _check_masks(masks, (height, width))
    if len(labels) != len(mask_list):
        raise ValueError(
            f"overlay: labels has {len(labels)} entries but masks has {len(mask_list)}; pass one label per mask"
        )
    if scores is not None and len(scores) != len(mask_list):
        raise ValueError(
            f"overlay: scores has {len(scores)} entries but masks has {len(mask_list)}; pass one score per mask "
            "or scores=None"
        )
    texts = [str(label) for label in labels]
    if scores is not None:
        texts = [f"{text} {float(score):.2f}" for text, score in zip(texts, scores)]
    colors = [palette_color(i) for i in range(len(mask_list))]
    return _render(pixels, mask_list, texts, colors, alpha=_check_alpha(alpha), outline=outline)


def panoptic_overlay(
    image: np.ndarray,
    segmentation: np.ndarray,
    segments: Sequence[tuple[int, str]],
    *,
    alpha: float = 0.5,
    outline: bool = True,
) -> Image.Image:
    """Draw a panoptic id map over an image: one colour and one label per segment.

    Args:
        image: [H, W, 3] uint8 RGB, as in `overlay`.
        segmentation: [H, W] integer ids; 0 is void (left unchanged), 1..n are segments
            (`PanopticResult.segmentation`).
        segments: (id, label text) pairs; the i-th pair gets `palette_color(i)`. Ids present in `segmentation` but
            not listed are left unchanged like void, so a caller can show only the segments it kept (e.g. above a
            display threshold) without rewriting the map.
        alpha, outline: as in `overlay`.
    """
    pixels = _check_image(image)
    height, width = pixels.shape[:2]
    ids = np.asarray(segmentation)
    if ids.shape != (height, width):
        raise ValueError(
            f"panoptic_overlay: segmentation has shape {tuple(ids.shape)} but the image is {height}x{width}; "
            "pass the id map at the image's size"
        )
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_):
        raise ValueError(
            f"panoptic_overlay: segmentation has dtype {ids.dtype}; pass integer segment ids (0 = void)"
        )
    seen: set[int] = set()
    for segment_id, _ in segments:
        if int(segment_id) <= 0:
            raise ValueError(f"panoptic_overlay: segment id {segment_id} is not positive; 0 is void, ids start at 1")
        if int(segment_id) in seen:
            raise ValueError(f"panoptic_overlay: segment id {segment_id} is listed twice in segments; list each once")
        seen.add(int(segment_id))
    mask_list = [ids == int(segment_id) for segment_id, _ in segments]
    texts = [str(label) for _, label in segments]
    colors = [palette_color(i) for i in range(len(segments))]
    return _render(pixels, mask_list, texts, colors, alpha=_check_alpha(alpha), outline=outline)


def side_by_side(images: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """Put images in one row with a title above each, e.g. "ground truth | prediction".

    The result is sum(widths) wide and max(heights) plus a title band high, on a white background; shorter images
    are top-aligned. A title wider than its panel is shortened with "...".
    """
    if len(images) == 0:
        raise ValueError("side_by_side: images is empty; pass at least one image")
    if len(titles) != len(images):
        raise ValueError(
            f"side_by_side: titles has {len(titles)} entries but images has {len(images)}; pass one title per image"
        )
    panels = [image.convert("RGB") for image in images]
    panel_height = max(panel.height for panel in panels)
    font = _font(max(12, min(panel_height, min(panel.width for panel in panels)) // 30))
    ascent, descent = font.getmetrics()
    pad = max(2, (ascent + descent) // 4)
    band = ascent + descent + 2 * pad
    canvas = Image.new("RGB", (sum(panel.width for panel in panels), panel_height + band), _TITLE_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles):
        canvas.paste(panel, (x, band))
        text = _fit(draw, str(title), font, panel.width - 2 * pad)
        text_width = draw.textlength(text, font=font)
        draw.text((x + max(pad, (panel.width - text_width) / 2), pad), text, fill=_TITLE_TEXT, font=font)
        x += panel.width
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as a PNG at `path` atomically and return the path.

    The parent directory is created; the bytes go to a temporary file in the same directory (same filesystem, so
    `os.replace` is atomic) and replace `path` only when complete: a reader never sees a half-written PNG.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    # os.open with 0o666 (not tempfile.mkstemp, which makes 0o600 files) so the PNG gets the umask's usual mode
    # and stays readable by whoever serves or uploads it.
    handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as tmp:
            image.save(tmp, format="PNG")
        os.replace(tmp_name, target)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    return target


def label_anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """(x, y) of the mask pixel nearest to the mask's centroid, or None for an empty mask.

    The centroid itself can fall outside a ring- or C-shaped mask; the nearest mask pixel is always inside it.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def _render(
    pixels: np.ndarray,
    masks: list[np.ndarray],
    texts: list[str],
    colors: list[Color],
    *,
    alpha: float,
    outline: bool,
) -> Image.Image:
    height, width = pixels.shape[:2]
    canvas = pixels.astype(np.float32)
    thickness = 1 if min(height, width) < 200 else 2
    for mask, color in zip(masks, colors):
        if not mask.any():
            continue
        solid = np.asarray(color, dtype=np.float32)
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * solid
        if outline:
            canvas[_boundary(mask, thickness)] = solid
    result = Image.fromarray(np.rint(canvas).astype(np.uint8), mode="RGB")

    font = _font(max(12, min(height, width) // 40))
    ascent, descent = font.getmetrics()
    pad = max(2, (ascent + descent) // 6)
    box_height = ascent + descent + 2 * pad
    draw = ImageDraw.Draw(result)
    placed: list[tuple[int, int, int, int]] = []
    for mask, text, color in zip(masks, texts, colors):
        anchor = label_anchor(mask)
        if anchor is None or not text:
            continue
        box_width = int(np.ceil(draw.textlength(text, font=font))) + 2 * pad
        box = _place(anchor, (box_width, box_height), (width, height), placed)
        placed.append(box)
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
        # Text at the font's ascent line (anchor "ls"), so every box holds its text at the same height.
        draw.text((x0 + pad, y0 + pad + ascent), text, fill=_text_color(color), font=font, anchor="ls")
    return result


def _place(
    anchor: tuple[int, int],
    size: tuple[int, int],
    bounds: tuple[int, int],
    placed: list[tuple[int, int, int, int]],
) -> tuple[int, int, int, int]:
    """A label box [x0, y0, x1, y1) centred on `anchor`, kept inside the image, nudged up or down a box height or
    two when it would cover a label already drawn (masks of touching objects often have nearby centroids)."""
    box_width, box_height = size
    width, height = bounds
    candidates = []
    for step in (0, 1, -1, 2, -2):
        x0 = _clamp(anchor[0] - box_width // 2, 0, width - box_width)
        y0 = _clamp(anchor[1] - box_height // 2 + step * box_height, 0, height - box_height)
        candidates.append((x0, y0, x0 + box_width, y0 + box_height))
    for box in candidates:
        if not any(_overlaps(box, other) for other in placed):
            return box
    return candidates[0]


def _clamp(value: int, low: int, high: int) -> int:
    # A box wider than the image starts at 0 and is cut on the right by the image edge.
    return max(low, min(value, high)) if high >= low else low


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Mask pixels within `thickness` 4-connected steps of a non-mask pixel or the image edge (the inner boundary,
    so the outline never paints pixels outside the mask)."""
    inner = mask
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def _text_color(background: Color) -> Color:
    """Black on light boxes, white on dark ones (ITU-R BT.601 luma)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue >= 128 else (255, 255, 255)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1, or built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: float) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def _check_image(image: Any) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"image has shape {tuple(pixels.shape)}; pass an [H, W, 3] RGB array "
            "(e.g. np.asarray(Image.open(path).convert('RGB')))"
        )
    if pixels.dtype != np.uint8:
        raise ValueError(
            f"image has dtype {pixels.dtype}; pass uint8 values 0..255 (for floats in [0, 1]: "
            "(image * 255).round().astype(np.uint8))"
        )
    return pixels


def _check_masks(masks: Sequence[np.ndarray] | np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    height, width = size
    if getattr(masks, "ndim", None) == 2:
        raise ValueError(
            f"masks has shape {tuple(masks.shape)}, one [H, W] mask; pass a sequence or an [N, H, W] array "
            "(e.g. [mask] or mask[None])"
        )
    result = []
    for index, mask in enumerate(masks):
        array = np.asarray(mask)
        if array.shape != (height, width):
            raise ValueError(
                f"masks[{index}] has shape {tuple(array.shape)} but the image is {height}x{width}; "
                "resize the masks to the image's size (e.g. postprocess restores them to the original size)"
            )
        if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(
                f"masks[{index}] has dtype {array.dtype}; pass bool masks (threshold probabilities or logits "
                "first, e.g. probs > 0.5)"
            )
        result.append(array.astype(bool, copy=False))
    return result


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha is {alpha}; pass an opacity in [0, 1]")
    return float(alpha)
