"""`xsam data preview`: draw one record of a dataset as a PNG, to check it by eye.

The picture holds, top to bottom:
- a title: the record key, task, source (corpus / split / upstream ids / file), shard;
- the image with every segment mask alpha-blended in its own colour (`segment_color(i)` for the
  i-th segment of the record) and outlined, a label (`i: phrase or category`) on a filled box at
  an interior point of each mask, visual prompts outlined in white, and the ignore region greyed
  and hatched;
- the item's rendered conversation (turns wrapped; `<p>...</p>` spans in blue, special strings in
  red) and, per `<SEG>`, which segments it answers and with which span, in the segments' colours.

Read-only, through `Storage` (local folders and `s3://`).
"""

from __future__ import annotations

import colorsys
import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataprep.lint import group_by_key, iter_members
from xsam.data.manifest import INDEX, SHARDS_DIR, load_dataset, read_parquet
from xsam.data.storage import Storage
from xsam.data import masks
from xsam.data.schema import Item, Record, ShardSample

MASK_ALPHA = 0.5  # weight of a segment's colour over the image inside its mask
IGNORE_GREY = (128, 128, 128)
IGNORE_ALPHA = 0.55
HATCH = (40, 40, 40)
HATCH_PERIOD = 7
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
DIM = (140, 140, 140)
SPAN = (25, 80, 200)
SPECIAL = (200, 30, 30)
PAD = 12
MIN_SIDE = 900  # images whose long side is shorter are shown enlarged (labels get room)
MAX_SIDE = 1400  # ... longer are shown reduced
MIN_PANEL_WIDTH = 720

GLUE = "\ue000"  # a space that never breaks a line (drawn as a plain space)
_SPECIAL_RE = re.compile(r"(<p>.*?</p>|<SEG>|<image>|<region>)", re.DOTALL)


class PreviewError(Exception):
    """The requested record cannot be found or shown (bad key / index / item)."""


@functools.lru_cache(maxsize=1)
def _palette() -> tuple[tuple[int, int, int], ...]:
    """64 colours, each as far (RGB distance) from all earlier ones as the candidates allow.

    Greedy farthest-point order over saturated, not-too-dark HSV candidates: the first few colours
    of a record are the most distinct (the 32 first are >= 85 apart). Pure arithmetic: the same on
    every machine.
    """
    cands = np.array(
        [
            colorsys.hsv_to_rgb(h / 36, s, v)
            for h in range(36)
            for s in (0.5, 0.75, 1.0)
            for v in (0.6, 0.8, 1.0)
        ]
    ) * 255.0
    first = 2 * 9 + 1 * 3 + 2  # hue 2/36 (orange), saturation 0.75, value 1.0
    order = [first]
    dist = np.linalg.norm(cands - cands[first], axis=1)
    while len(order) < 64:
        j = int(np.argmax(dist))
        order.append(j)
        dist = np.minimum(dist, np.linalg.norm(cands - cands[j], axis=1))
    return tuple(tuple(int(round(c)) for c in cands[j]) for j in order)  # type: ignore[misc]


def segment_color(i: int) -> tuple[int, int, int]:
    """The colour of a record's i-th segment (deterministic; neighbours in the list differ most)."""
    palette = _palette()
    if i < len(palette):
        return palette[i]
    hue = (i * 0.618033988749895) % 1.0  # beyond 64 segments: golden-ratio hue steps
    r, g, b = colorsys.hsv_to_rgb(hue, (0.55, 0.8, 1.0)[i % 3], (0.7, 0.85, 1.0)[(i // 3) % 3])
    return (round(r * 255), round(g * 255), round(b * 255))


def blend(pixel: Any, color: tuple[int, int, int], alpha: float = MASK_ALPHA) -> np.ndarray:
    """What a mask pixel of `color` over image `pixel` looks like in the preview."""
    return (1.0 - alpha) * np.asarray(pixel, dtype=np.float64) + alpha * np.asarray(color, dtype=np.float64)


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """A segment colour dark enough to read as text on white."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    factor = min(1.0, 110.0 / max(luminance, 1.0))
    return (round(color[0] * factor), round(color[1] * factor), round(color[2] * factor))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------------- loading


@dataclass(kw_only=True, slots=True)
class PreviewSample:
    """One record read back from a dataset, with where it was found."""

    key: str
    shard: str
    position: int  # row number in index.parquet
    record: Record
    items: list[Item]
    image_bytes: bytes


def load_sample(storage: Storage, *, key: str | None = None, index: int | None = None) -> PreviewSample:
    """The record `key`, or the `index`-th record in index.parquet order (exactly one of them)."""
    if (key is None) == (index is None):
        raise PreviewError("give exactly one of --key KEY or --index N")
    load_dataset(storage)  # a clear error when the folder is not a complete dataset
    rows = read_parquet(storage, INDEX)
    if index is not None:
        if not 0 <= index < len(rows):
            raise PreviewError(f"--index {index} is out of range: the dataset has {len(rows)} records (0..{len(rows) - 1})")
        position = index
    else:
        positions = [i for i, row in enumerate(rows) if row["key"] == key]
        if not positions:
            near = [row["key"] for row in rows if key and (key in row["key"] or row["key"] in key)][:5]
            hint = f"; similar keys: {', '.join(near)}" if near else (
                f"; e.g. {rows[0]['key']}" if rows else "; the dataset has no records"
            )
            raise PreviewError(f"key {key!r} is not in {storage.describe(INDEX)}{hint}")
        position = positions[0]
    row = rows[position]
    rel = f"{SHARDS_DIR}/{row['shard']}"
    if not storage.exists(rel):
        raise PreviewError(f"index.parquet puts {row['key']} in {storage.describe(rel)}, which does not exist")
    found: dict[str, bytes] | None = None
    with storage.open_read(rel) as stream:
        for member_key, group in group_by_key(iter_members(stream)):
            if member_key == row["key"]:
                found = {m.name.partition(".")[2]: m.data for m in group if m.data is not None}
                break
    if found is None or "json" not in found:
        raise PreviewError(f"{row['key']} is not in {storage.describe(rel)} (run `xsam data lint`)")
    sample = ShardSample.model_validate_json(found["json"])
    if sample.record.image is None:  # a text-only chat record: a blank panel stands for the image
        buf = io.BytesIO()
        Image.new("RGB", (640, 48), (235, 235, 235)).save(buf, format="PNG")
        image: bytes | None = buf.getvalue()
    else:
        image = found.get(sample.record.image.ext)
    if image is None:
        raise PreviewError(f"{row['key']} has no {row['key']}.{sample.record.image.ext} member in {rel}")
    return PreviewSample(
        key=row["key"], shard=row["shard"], position=position, record=sample.record, items=sample.items, image_bytes=image
    )


# ---------------------------------------------------------------------------------- geometry


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~_erode(mask)


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(x, y) deep inside `mask`: nearest the centroid among the pixels that survive most erosions.

    Works on a mask reduced to at most ~160 px a side, so a big mask costs a few milliseconds.
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    step = max(1, max(mask.shape) // 160)
    small = mask[::step, ::step]
    core = small
    while True:
        nxt = _erode(core)
        if not nxt.any():
            break
        core = nxt
    cy, cx = ys.mean() / step, xs.mean() / step
    kys, kxs = np.nonzero(core)
    if kxs.size == 0:  # the mask vanished when reduced: fall back to its pixel nearest the centroid
        j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        return int(xs[j]), int(ys[j])
    j = int(np.argmin((kys - cy) ** 2 + (kxs - cx) ** 2))
    return int(kxs[j] * step + step // 2), int(kys[j] * step + step // 2)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ----------------------------------------------------------------------------------- text


@dataclass(slots=True)
class _Atom:
    """A run of text between two break opportunities, possibly in several colours."""

    parts: list[tuple[str, tuple[int, int, int]]]
    newlines_before: int = 0


def _atoms(runs: list[tuple[str, tuple[int, int, int]]]) -> list[_Atom]:
    atoms: list[_Atom] = []
    current: _Atom | None = None
    pending_newlines = 0
    for text, color in runs:
        for piece in re.split(r"(\s+)", text):
            if not piece:
                continue
            if piece.isspace():
                pending_newlines += piece.count("\n")
                current = None
                continue
            if current is None:
                current = _Atom(parts=[], newlines_before=pending_newlines)
                pending_newlines = 0
                atoms.append(current)
            current.parts.append((piece.replace(GLUE, " "), color))
    return atoms


def _layout(
    runs: list[tuple[str, tuple[int, int, int]]], font: Any, width: int, line_h: int
) -> tuple[list[tuple[int, int, str, tuple[int, int, int]]], int]:
    """Word-wrap coloured runs into `width` px; returns ([(x, y, text, colour)], height)."""
    space = font.getlength(" ")
    placed: list[tuple[int, int, str, tuple[int, int, int]]] = []
    x, y = 0.0, 0
    for atom in _atoms(runs):
        if atom.newlines_before and placed:
            y += line_h * atom.newlines_before
            x = 0.0
        widths = [font.getlength(t) for t, _ in atom.parts]
        total = sum(widths)
        if x > 0 and x + space + total > width:
            y += line_h
            x = 0.0
        elif x > 0:
            x += space
        for (text, color), w in zip(atom.parts, widths):
            while x + w > width and len(text) > 1:  # a single word wider than the panel: cut it
                cut = len(text)
                while cut > 1 and x + font.getlength(text[:cut]) > width:
                    cut -= 1
                placed.append((round(x), y, text[:cut], color))
                text = text[cut:]
                y += line_h
                x = 0.0
                w = font.getlength(text)
            placed.append((round(x), y, text, color))
            x += w
    height = (y + line_h) if placed else 0
    return placed, height


def _turn_runs(text: str, targeted_spans: set[int], span_counter: list[int]) -> list[tuple[str, tuple[int, int, int]]]:
    runs: list[tuple[str, tuple[int, int, int]]] = []
    for piece in _SPECIAL_RE.split(text):
        if not piece:
            continue
        if piece.startswith("<p>") and piece.endswith("</p>"):
            k = span_counter[0]
            span_counter[0] += 1
            runs.append(("<p>", DIM))
            runs.append((piece[3:-4], SPAN if k in targeted_spans else TEXT))
            runs.append(("</p>", DIM))
        elif _SPECIAL_RE.fullmatch(piece):
            runs.append((piece, SPECIAL))
        else:
            runs.append((piece, TEXT))
    return runs


def span_texts(item: Item) -> list[str]:
    """The text inside the item's `<p>...</p>` spans, in reading order (= `Item.spans` order)."""
    return [m.group(1) for t in item.turns for m in re.finditer(r"<p>(.*?)</p>", t.text, re.DOTALL)]


def segment_label(record: Record, i: int, max_chars: int = 36) -> str:
    seg = record.segments[i]
    if seg.phrase_index is not None and seg.phrase_index < len(record.phrases):
        name = record.phrases[seg.phrase_index]
    elif seg.category_name:
        name = seg.category_name
    elif seg.category_id is not None:
        name = f"category {seg.category_id}"
    else:
        name = f"id {seg.id}"
    if len(name) > max_chars:
        name = name[: max_chars - 3] + "..."
    return f"{i}: {name}" + (" (crowd)" if seg.iscrowd else "")


# ----------------------------------------------------------------------------------- render


@dataclass(kw_only=True, slots=True)
class Preview:
    """The rendered picture and where things are in it (canvas pixels)."""

    image: Image.Image
    origin: tuple[int, int]  # top-left of the record's image in the canvas
    scale: float  # canvas pixels per image pixel
    label_boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # segment -> box

    def to_canvas(self, x: float, y: float) -> tuple[int, int]:
        """Canvas pixel of image pixel (x, y)."""
        return (self.origin[0] + int(x * self.scale + self.scale / 2), self.origin[1] + int(y * self.scale + self.scale / 2))


def _display_scale(width: int, height: int) -> float:
    side = max(width, height)
    if side < MIN_SIDE:
        return MIN_SIDE / side
    if side > MAX_SIDE:
        return MAX_SIDE / side
    return 1.0


def display_base(image_bytes: bytes) -> tuple[np.ndarray, float]:
    """The image as shown, before any overlay: (H', W', 3) uint8 RGB, and canvas px per image px."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        rgb = im.convert("RGB")
    width = rgb.width
    factor = _display_scale(rgb.width, rgb.height)
    size = (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(rgb), size[0] / width


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def _overlay(
    record: Record, base: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray | None]:
    """Blend every segment into `base` (display size); returns (pixels, display masks, ignore)."""
    out = base.astype(np.float64)
    seg_masks: list[np.ndarray | None] = []
    for seg in record.segments:
        try:
            seg_masks.append(_resize_mask(masks.decode(seg.rle), size))
        except Exception:  # a broken mask is lint's business; show the rest
            seg_masks.append(None)
    # big masks first, so that small ones stay visible where masks overlap
    order = sorted(range(len(seg_masks)), key=lambda i: -(seg_masks[i].sum() if seg_masks[i] is not None else 0))
    for i in order:
        mask = seg_masks[i]
        if mask is None:
            continue
        out[mask] = blend(out[mask], segment_color(i))
    for i in order:
        mask = seg_masks[i]
        if mask is not None:
            out[_boundary(mask)] = segment_color(i)
    ignore = None
    if record.ignore is not None:
        try:
            ignore = _resize_mask(masks.decode(record.ignore), size)
        except Exception:
            ignore = None
    if ignore is not None and ignore.any():
        out[ignore] = blend(out[ignore], IGNORE_GREY, IGNORE_ALPHA)
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        hatch = ignore & (((xx + yy) % HATCH_PERIOD) < 2)
        out[hatch] = HATCH
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), seg_masks, ignore


def _draw_prompts(draw: ImageDraw.ImageDraw, record: Record, size: tuple[int, int], scale: float, font: Any) -> None:
    for k, vp in enumerate(record.visual_prompts):
        anchor: tuple[int, int] | None = None
        if vp.rle is not None:
            try:
                mask = _resize_mask(masks.decode(vp.rle), size)
            except Exception:
                mask = None
            if mask is not None:
                edge = _boundary(mask)
                thick = edge | _boundary(_erode(mask))
                ys, xs = np.nonzero(thick)
                for x, y in zip(xs.tolist(), ys.tolist()):
                    draw.point((x, y), fill=(255, 255, 255))
                anchor = interior_point(mask)
        geometry = vp.geometry or {}
        box = geometry.get("box")
        if isinstance(box, (list, tuple)) and len(box) == 4:  # [x, y, w, h] like Segment.bbox
            x, y, w, h = (float(v) * scale for v in box)
            draw.rectangle((x, y, x + w, y + h), outline=(255, 255, 255), width=3)
            draw.rectangle((x, y, x + w, y + h), outline=(0, 0, 0), width=1)
            anchor = anchor or (int(x), int(y))
        points = geometry.get("points")
        if isinstance(points, list) and points and all(isinstance(p, (list, tuple)) and len(p) >= 2 for p in points):
            pts = [(float(p[0]) * scale, float(p[1]) * scale) for p in points]
            if vp.kind == "scribble" and len(pts) > 1:
                draw.line(pts, fill=(255, 255, 255), width=4)
                draw.line(pts, fill=(0, 0, 0), width=1)
            for px, py in pts if vp.kind != "scribble" else pts[:1]:
                draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
            anchor = anchor or (int(pts[0][0]), int(pts[0][1]))
        if anchor is not None:
            text = f"prompt {k} ({vp.kind})"
            anchor = (anchor[0] + 8, anchor[1] + 4)  # beside the point / corner, not on it
            l, t, r, b = draw.textbbox(anchor, text, font=font)
            draw.rectangle((l - 3, t - 2, r + 3, b + 2), fill=(255, 255, 255), outline=(0, 0, 0))
            draw.text(anchor, text, fill=(0, 0, 0), font=font)


def _draw_labels(
    draw: ImageDraw.ImageDraw, record: Record, seg_masks: list[np.ndarray | None], size: tuple[int, int], font: Any
) -> dict[int, tuple[int, int, int, int]]:
    boxes: dict[int, tuple[int, int, int, int]] = {}
    placed: list[tuple[int, int, int, int]] = []
    # small segments first: they have the fewest good places
    order = sorted(range(len(seg_masks)), key=lambda i: seg_masks[i].sum() if seg_masks[i] is not None else 0)
    for i in order:
        mask = seg_masks[i]
        if mask is None:
            continue
        point = interior_point(mask)
        if point is None:
            continue
        text = segment_label(record, i)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        w, h = r - l + 6, b - t + 4
        best = None
        for dy in (0, -1, 1, -2, 2, -3, 3):
            x0 = min(max(point[0] - w // 2, 0), max(size[0] - w, 0))
            y0 = min(max(point[1] - h // 2 + dy * (h + 1), 0), max(size[1] - h, 0))
            box = (x0, y0, x0 + w, y0 + h)
            if best is None:
                best = box
            if not any(_overlaps(box, other) for other in placed):
                best = box
                break
        assert best is not None
        color = segment_color(i)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.rectangle(best, fill=color, outline=(0, 0, 0))
        draw.text((best[0] + 3 - l, best[1] + 2 - t), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
        placed.append(best)
        boxes[i] = best
    return boxes


def render_preview(
    record: Record,
    image_bytes: bytes,
    items: list[Item],
    *,
    item_index: int = 0,
    labels: bool = True,
    subtitle: str = "",
) -> Preview:
    """Draw `record` (image, masks, labels, ignore, prompts) above item `item_index`'s conversation."""
    if items and not 0 <= item_index < len(items):
        raise PreviewError(f"--item {item_index} is out of range: the record has {len(items)} items (0..{len(items) - 1})")
    base, scale = display_base(image_bytes)
    size = (base.shape[1], base.shape[0])
    pixels, seg_masks, _ = _overlay(record, base, size)
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    label_px = int(min(20, max(12, size[0] / 70)))
    label_font = _font(label_px)
    _draw_prompts(draw, record, size, scale, label_font)
    boxes = _draw_labels(draw, record, seg_masks, size, label_font) if labels else {}

    canvas_w = max(size[0], MIN_PANEL_WIDTH) + 2 * PAD
    text_w = canvas_w - 2 * PAD
    title_font, body_font, small_font = _font(20), _font(15), _font(13)
    body_h, small_h = 20, 17

    src = record.source
    ids = ", ".join(f"{k} {v}" for k, v in src.upstream_ids.items())
    title_runs = [(record.key, TEXT)]
    facts = [
        f"task {record.task}",
        f"source {src.corpus} / {src.split}",
        ids,
        f"{record.image.file_name} {record.image.width}x{record.image.height}" if record.image else "no image (text-only)",
        f"{len(record.segments)} segments",
    ]
    if record.visual_prompts:
        facts.append(f"{len(record.visual_prompts)} visual prompts")
    if record.ignore is not None:
        facts.append("ignore region hatched")
    if subtitle:
        facts.extend(subtitle.split(" · "))
    info_runs = [(" · ".join(fact.replace(" ", GLUE) for fact in facts), DIM)]
    title_layout, title_h = _layout(title_runs, title_font, text_w, 26)
    info_layout, info_h = _layout(info_runs, small_font, text_w, small_h)

    # the conversation panel
    panel: list[tuple[list[tuple[int, int, str, tuple[int, int, int]]], int, Any]] = []  # (layout, height, font)
    if items:
        item = items[item_index]
        header = (
            f"item {item_index} of {len(items)}: {item.key} · {item.mode} · seed {item.seed} · epoch {item.epoch}"
            + (f" · templates {', '.join(item.template_ids)}" if item.template_ids else "")
        )
        panel.append((*_layout([(header, DIM)], small_font, text_w, small_h), small_font))
        targeted = {t.span for s in item.segs for t in s.targets}
        counter = [0]
        for turn in item.turns:
            role = "USER" if turn.role == "user" else "ASSISTANT"
            runs = [(f"{role}:", (0, 110, 0) if turn.role == "assistant" else (110, 60, 0))]
            runs += _turn_runs(" " + turn.text, targeted, counter)
            panel.append((*_layout(runs, body_font, text_w, body_h), body_font))
        spans = span_texts(item)
        for j, answer in enumerate(item.segs):
            runs = [(f"<SEG> {j} (turn {answer.turn}) answers {len(answer.targets)} masks:", SPECIAL)]
            for target in answer.targets:
                name = segment_label(record, target.segment).split(": ", 1)[-1] if target.segment < len(record.segments) else "?"
                span = spans[target.span] if target.span < len(spans) else "?"
                color = _text_color(segment_color(target.segment)) if target.segment < len(record.segments) else TEXT
                runs.append((f" {target.segment}", color))
                runs.append((f" {name} -> '{span}' (span {target.span});", TEXT))
            panel.append((*_layout(runs, small_font, text_w, small_h), small_font))
    else:
        panel.append((*_layout([("(this record has no items)", DIM)], body_font, text_w, body_h), body_font))
    extra: list[tuple[str, tuple[int, int, int]]] = []
    if record.captions:
        extra.append(("captions: " + " | ".join(record.captions), DIM))
    if extra:
        panel.append((*_layout(extra, small_font, text_w, small_h), small_font))

    gap = 8
    image_top = PAD + title_h + 2 + info_h + gap
    panel_top = image_top + size[1] + gap + 4
    panel_h = sum(h + gap for _, h, _ in panel)
    canvas = Image.new("RGB", (canvas_w, panel_top + panel_h + PAD), BACKGROUND)
    canvas.paste(picture, (PAD, image_top))
    cdraw = ImageDraw.Draw(canvas)

    def put(layout: list[tuple[int, int, str, tuple[int, int, int]]], top: int, font: Any) -> None:
        for x, y, text, color in layout:
            cdraw.text((PAD + x, top + y), text, fill=color, font=font)

    put(title_layout, PAD, title_font)
    put(info_layout, PAD + title_h + 2, small_font)
    cdraw.line((PAD, panel_top - 6, canvas_w - PAD, panel_top - 6), fill=(200, 200, 200), width=1)
    y = panel_top
    for layout, h, font in panel:
        put(layout, y, font)
        y += h + gap
    shifted = {i: (b[0] + PAD, b[1] + image_top, b[2] + PAD, b[3] + image_top) for i, b in boxes.items()}
    return Preview(image=canvas, origin=(PAD, image_top), scale=scale, label_boxes=shifted)


def write_preview(
    storage: Storage,
    png: str | Path,
    *,
    key: str | None = None,
    index: int | None = None,
    item: int = 0,
) -> tuple[Path, PreviewSample]:
    """Render a record of the dataset at `storage` to the local PNG file `png`."""
    sample = load_sample(storage, key=key, index=index)
    preview = render_preview(
        sample.record,
        sample.image_bytes,
        sample.items,
        item_index=item,
        subtitle=f"{SHARDS_DIR}/{sample.shard} · index row {sample.position}",
    )
    path = Path(png)
    path.parent.mkdir(parents=True, exist_ok=True)
    preview.image.save(path, format="PNG", optimize=False)
    return path, sample
