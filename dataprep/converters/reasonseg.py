"""ReasonSeg (LISA's reasoning-segmentation release) -> reaseg records.

Upstream layout (LISA, `dataset/reason_seg/ReasonSeg/{train,val,test}/`): one `NAME.jpg` plus a
same-named LabelMe-style `NAME.json` per image:

    {"text": ["query", ...], "is_sentence": bool,
     "shapes": [{"label": "target" | "ignore" | "flag" | ..., "points": [[x, y], ...],
                 "shape_type": "polygon"}, ...], ...}

and, for training, `explanatory/train.json`: a list of `{"image": "NAME.jpg", "query": str,
"outputs": str}` (LISA's `reason_seg_dataset.py` maps image file name -> explanation `outputs`,
and uses that one explanation for every query of the image).

`xsam data convert reasonseg --out OUT --src ReasonSeg/train [--explanations explanatory/train.json]`

Decoding: each JSON is decoded as UTF-8, else as cp1252 (some release files are cp1252, LISA's
`get_mask_from_json` falls back the same way); neither, or not a JSON object of the shape above ->
record-level `invalid_annotation`.

Mask rule (LISA `utils/data_processing.py` `get_mask_from_json`): shapes whose label is `flag`
(case-insensitive) are skipped; the others are rasterised with OpenCV `polylines(closed, thickness
1) + fillPoly` on their points cast to int32 (truncation toward zero), sorted by that raster's pixel
count, largest first (numpy `argsort(...)[::-1]`, i.e. ties in reverse input order), and painted in
that order onto one uint8 map: 255 where the label contains "ignore" (case-insensitive), else 1.
Later (smaller) shapes overwrite earlier ones. Then:
- the record's ONE segment = pixels equal to 1 (what LISA trains on, `mask == 1`);
- `Record.ignore` = pixels equal to 255 (None when there is none).
So a target pixel covered by a smaller ignore shape is ignore, and an ignore pixel covered by a
smaller target shape is target.

The rasteriser (`polygon_raster`) re-implements, in numpy without OpenCV, what OpenCV's
`fillPoly`/`polylines` do for one contour with `lineType=LINE_8`, `shift=0`:
- every edge v[i-1] -> v[i] is drawn with OpenCV's 8-connected `LineIterator` Bresenham walk
  (started at the left end point, `err = dx - 2 dy`, minor step while `err < 0`), after clipping the
  segment to the image with `clipLine`'s rule; `polylines` draws exactly these lines again;
- the interior is OpenCV's `FillEdgeCollection` scan conversion: non-horizontal edges in 16.16
  fixed point (`dx = ((x1 - x0) << 16) / (y1 - y0)` truncated toward zero; an edge leaving the
  image takes its slope from the clipped segment), each active on rows `y0 <= y < y1` with
  `x = x_top + (y - y0) dx`; per row the active x are sorted and paired, and pixels
  `ceil(x_a) .. floor(x_b)` are filled; nothing is filled with fewer than two non-horizontal edges.
Exactness: checked against real `cv2.polylines` + `cv2.fillPoly` (opencv-python-headless 5.0.0, in a
throwaway environment, not a dependency) on 606 polygons: pixel-equal on every polygon inside the
image (372 random ones and the 6 real COCO polygons of image 39769), and on 223 of 234 random
polygons crossing the image border; 11 border-crossing ones differ by 1-34 pixels along the border
(OpenCV's handling of clipped edges is not fully reproduced). LabelMe polygons are drawn inside the
image, so this should not matter in practice, but it is not proven for every input. The tests compare
against PIL's `ImageDraw.polygon(outline=...)`, an independent rasteriser whose boundary rule
differs: they agree except on pixels next to the outline.

Record: key `make_key("reasonseg", split, stem)`; split = `--split` or the folder (archive) name
(`train`/`val`/`test`); `phrases` = the queries as given (LISA lowercases short queries when it
builds prompts; we keep them raw); `meta["is_sentence"]` (bool), `meta["explanations"]` (list aligned
with phrases: the image's explanation for every query, or None), `meta["phrase_segments"]` = [[0]]
per query; `source.upstream_ids = {"image": NAME}`; `source.annotation_file` = `NAME.json` with its
own sha256 (dataset identity also hashes the explanations file and a fingerprint of the names and
sizes of the listed files).

Quarantine: image without JSON -> `missing_annotation`; JSON without image -> `missing_file`; no
query, malformed shapes or undecodable JSON -> `invalid_annotation`; a polygon with fewer than 3
points -> part-level `degenerate_polygon` (LISA would draw it; we cannot tell a sliver from a typo,
so it is dropped and recorded); no target pixel left -> record-level `empty_mask`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Converter,
    InputFile,
    Plan,
    UpstreamRecord,
    cached_tree,
    estimate_bytes,
    image_model,
    load_json_input,
    read_image,
)
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.sources import open_tree
from xsam.data import masks
from xsam.data.schema import Record, Segment, Source, make_key

CORPUS = "reasonseg"
TARGET_VALUE, IGNORE_VALUE = 1, 255
_XY_SHIFT = 16
_LEFT_DELTA = (1 << _XY_SHIFT) - 1  # a span starts at ceil(x_left) and ends at floor(x_right)
FIX_SRC = "pass one split folder of the LISA release, e.g. --src ReasonSeg/train (NAME.jpg + NAME.json pairs)"
FIX_EXPL = "pass LISA's explanatory/train.json: a list of {image, query, outputs}"


# ---- OpenCV-equivalent polygon rasterisation (LINE_8, shift 0) ------------------------------


def _clip_line(w: int, h: int, x1: int, y1: int, x2: int, y2: int) -> tuple[int, int, int, int] | None:
    """OpenCV `clipLine` on an image of size (w, h): the segment clipped to [0, w-1] x [0, h-1]."""
    right, bottom = w - 1, h - 1

    def code(x: int, y: int) -> int:
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int((a - y1) * (x2 - x1) / (y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int((a - y2) * (x2 - x1) / (y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int((a - x1) * (y2 - y1) / (x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int((a - x2) * (y2 - y1) / (x2 - x1))
                x2 = a
                c2 = 0
    if (c1 | c2) != 0:
        return None
    return x1, y1, x2, y2


def _draw_line(out: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> None:
    """OpenCV `Line` (8-connected `LineIterator`, left to right) from (x1, y1) to (x2, y2)."""
    h, w = out.shape
    clipped = _clip_line(w, h, x1, y1, x2, y2)
    if clipped is None:
        return
    x1, y1, x2, y2 = clipped
    if x2 < x1:  # leftToRight: start at the left end point
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, y2 - y1
    sy = -1 if dy < 0 else 1
    dy = abs(dy)
    if dy > dx:  # y is the major axis
        major, minor, n = dy, dx, dy + 1
        i = np.arange(n)
        steps = _minor_steps(major, minor, n)
        ys, xs = y1 + sy * i, x1 + steps
    else:
        major, minor, n = dx, dy, dx + 1
        i = np.arange(n)
        steps = _minor_steps(major, minor, n)
        xs, ys = x1 + i, y1 + sy * steps
    out[ys, xs] = True


def _minor_steps(major: int, minor: int, n: int) -> np.ndarray:
    """Minor-axis offset of each of the n pixels: the walk steps minor when err < 0, where
    err_0 = major - 2 minor and each step adds -2 minor (+ 2 major when it stepped)."""
    steps = np.zeros(n, dtype=np.int64)
    err = major - 2 * minor
    m = 0
    for k in range(1, n):
        if err < 0:
            m += 1
            err += 2 * major - 2 * minor
        else:
            err -= 2 * minor
        steps[k] = m
    return steps


def polygon_raster(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: `cv2.polylines(m, [pts], True, 1, 1)` + `cv2.fillPoly(m, [pts], 1)` for one
    int32 contour `points` (N, 2) of (x, y), as OpenCV 8-connected drawing does (see module doc)."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((height, width), dtype=bool)
    n = len(pts)
    if n == 0:
        return out
    # edges (fillPoly draws them, polylines draws them again)
    for i in range(n):
        x0, y0 = (int(v) for v in pts[i - 1])
        x1, y1 = (int(v) for v in pts[i])
        _draw_line(out, x0, y0, x1, y1)
    # scan-converted interior
    edges = []
    for i in range(n):
        x0, y0 = (int(v) for v in pts[i - 1])
        x1, y1 = (int(v) for v in pts[i])
        if y0 == y1:
            continue
        cx0, cy0, cx1, cy1 = x0, y0, x1, y1
        if not (0 <= x0 < width and 0 <= x1 < width and 0 <= y0 < height and 0 <= y1 < height):
            clipped = _clip_line(width, height, x0, y0, x1, y1)
            if clipped is not None and clipped[1] != clipped[3]:
                cx0, cy0, cx1, cy1 = clipped  # OpenCV builds the edge from the clipped segment
        num = (cx1 - cx0) << _XY_SHIFT
        den = cy1 - cy0
        q = abs(num) // abs(den)
        slope = q if (num >= 0) == (den > 0) else -q  # C division truncates toward zero
        if y0 < y1:  # x at the original top row, extrapolated along the (clipped) slope
            edges.append((y0, y1, (cx0 << _XY_SHIFT) + (y0 - cy0) * slope, slope))
        else:
            edges.append((y1, y0, (cx1 << _XY_SHIFT) + (y1 - cy1) * slope, slope))
    if len(edges) < 2:
        return out
    y_lo = max(min(e[0] for e in edges), 0)
    y_hi = min(max(e[1] for e in edges), height)
    for y in range(y_lo, y_hi):
        xs = sorted(x + (y - top) * dx for top, bottom, x, dx in edges if top <= y < bottom)
        for a, b in zip(xs[0::2], xs[1::2]):
            xa, xb = (a + _LEFT_DELTA) >> _XY_SHIFT, b >> _XY_SHIFT
            if xa < width and xb >= 0:
                out[y, max(xa, 0) : min(xb, width - 1) + 1] = True
    return out


def lisa_label_map(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """LISA's `get_mask_from_json` map: uint8 (H, W), 0 background, 1 target, 255 ignore.

    `shapes` must already be valid (label str, >= 3 int-castable points); `flag` shapes are skipped.
    """
    valid, rasters = [], []
    for shape in shapes:
        if shape["label"].lower() == "flag":
            continue
        raster = polygon_raster(np.array(shape["points"], dtype=np.float64).astype(np.int32), height, width)
        valid.append(shape)
        rasters.append(raster)
    areas = np.array([int(r.sum()) for r in rasters], dtype=np.int64)
    order = list(np.argsort(areas)[::-1]) if len(areas) else []
    label = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        label[rasters[i]] = IGNORE_VALUE if "ignore" in valid[i]["label"].lower() else TARGET_VALUE
    return label


# ---- parsing --------------------------------------------------------------------------------


def decode_annotation(raw: bytes) -> tuple[dict[str, Any], str]:
    """LabelMe JSON bytes -> (document, encoding): UTF-8 first, then cp1252 (as LISA falls back)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise ValueError("the JSON is not an object")
        return doc, encoding
    raise ValueError("neither UTF-8 nor cp1252 text")


def check_annotation(doc: dict[str, Any]) -> str | None:
    """Why a decoded ReasonSeg JSON cannot be converted (None when it can)."""
    texts = doc.get("text")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        return f"`text` must be a non-empty list of query strings, got {str(texts)[:120]}"
    if not isinstance(doc.get("is_sentence"), bool):
        return f"`is_sentence` must be a bool, got {doc.get('is_sentence')!r}"
    shapes = doc.get("shapes")
    if not isinstance(shapes, list):
        return "`shapes` must be a list"
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            return f"shapes[{i}] has no string `label`"
        pts = shape.get("points")
        ok = isinstance(pts, list) and all(
            isinstance(p, list) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 2**31 for v in p)
            for p in pts
        )
        if not ok:
            return f"shapes[{i}] `points` must be a list of finite [x, y] pairs"
    return None


def load_explanations(path: str) -> tuple[dict[str, str], InputFile]:
    data, source = load_json_input(path, "explanations", FIX_EXPL)
    if not isinstance(data, list):
        raise InputError(f"--explanations: {path} must be a JSON list; {FIX_EXPL}")
    table: dict[str, str] = {}
    for i, entry in enumerate(data):
        ok = isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("outputs"), str)
        if not ok:
            raise InputError(f"--explanations: {path}: entry [{i}] lacks string `image`/`outputs`: {str(entry)[:200]}; {FIX_EXPL}")
        table[entry["image"]] = entry["outputs"]  # LISA's dict: a later entry for an image wins
    return table, source


# ---- the converter ------------------------------------------------------------------------------


class ReasonSeg(Converter):
    name = CORPUS
    task = "reaseg"
    version = "1"
    required_inputs = {"src": "one split folder (or .zip/.tar) of the LISA ReasonSeg release: NAME.jpg + NAME.json"}
    optional_inputs = {
        "explanations": "LISA's explanatory/train.json (image -> explanation), for the train split",
        "split": "split name for the keys (default: the --src folder name, e.g. train/val/test)",
    }
    example = (
        "xsam data convert reasonseg --out data/reasonseg-train --src ReasonSeg/train "
        "--explanations ReasonSeg/explanatory/train.json"
    )

    def _split(self) -> str:
        split = self.inputs.get("split")
        if not split:
            name = PurePosixPath(str(self.inputs["src"]).rstrip("/\\").replace("\\", "/")).name
            for ext in (".tar.gz", ".tgz", ".tar", ".zip"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            split = name
        return make_key(split)

    def parameters(self) -> dict[str, Any]:
        return {"split": self._split()}

    def _row(self, level: str, source_file: str, record_id: str, key: str, reason: str, message: str,
             part_id: str = "") -> QuarantineRow:
        return QuarantineRow(level=level, source_file=source_file, record_id=record_id, part_id=part_id, key=key,
                             reason=reason, message=message)

    def plan(self) -> Plan:
        split = self._split()
        tree = open_tree(self.inputs["src"], option="--src", hint=FIX_SRC)
        names = [n for n in tree.names() if "/" not in n]
        stems: dict[str, dict[str, str]] = {}
        for n in names:
            p = PurePosixPath(n)
            if p.suffix.lower() in (".jpg", ".jpeg", ".json"):
                stems.setdefault(p.stem, {})["json" if p.suffix.lower() == ".json" else "image"] = n
        if not stems:
            raise InputError(f"--src: {self.inputs['src']} holds no NAME.jpg/NAME.json pairs; {FIX_SRC}")
        explanations: dict[str, str] = {}
        inputs: list[InputFile] = []
        if self.inputs.get("explanations"):
            explanations, expl_source = load_explanations(self.inputs["explanations"])
            inputs.append(expl_source)
        fingerprint = hashlib.sha256()
        records: list[UpstreamRecord] = []
        rows: list[QuarantineRow] = []
        for stem in sorted(stems):
            files = stems[stem]
            key = make_key(CORPUS, split, stem)
            fingerprint.update(json.dumps([stem, sorted(files.items()), [tree.size(f) for f in sorted(files.values())]]).encode())
            if "json" not in files:
                rows.append(self._row("record", files["image"], stem, key, "missing_annotation",
                                      f"image {files['image']} has no {stem}.json next to it"))
                continue
            if "image" not in files:
                rows.append(self._row("record", files["json"], stem, key, "missing_file",
                                      f"{files['json']} has no image {stem}.jpg next to it"))
                continue
            raw = tree.read(files["json"])
            try:
                doc, encoding = decode_annotation(raw)
            except ValueError as err:
                rows.append(self._row("record", files["json"], stem, key, "invalid_annotation", f"{files['json']}: {err}"))
                continue
            why = check_annotation(doc)
            if why is not None:
                rows.append(self._row("record", files["json"], stem, key, "invalid_annotation", f"{files['json']}: {why}"))
                continue
            image_name = files["image"]
            payload = {
                "split": split, "stem": stem, "json_name": files["json"], "encoding": encoding,
                "json_sha256": hashlib.sha256(raw).hexdigest(),
                "text": doc["text"], "is_sentence": doc["is_sentence"],
                "shapes": [{"label": s["label"], "points": s["points"]} for s in doc["shapes"]],
                "explanation": explanations.get(PurePosixPath(image_name).name),
            }
            records.append(UpstreamRecord(key=key, record_id=stem, image_name=image_name,
                                          est_bytes=estimate_bytes(tree, image_name), payload=payload))
        inputs.append(InputFile(option="src", name=f"{split} file list", sha256=fingerprint.hexdigest()))
        records.sort(key=lambda r: r.key)
        return Plan(records=records, quarantine=rows, inputs=inputs, splits=[split])

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        pl = upstream.payload
        data, info = read_image(cached_tree(self.inputs["src"], "--src"), upstream.image_name, options)
        image = image_model(data, info, upstream.image_name, None)
        h, w = image.height, image.width
        parts: list[QuarantineRow] = []
        shapes = []
        for i, shape in enumerate(pl["shapes"]):
            if shape["label"].lower() != "flag" and len(shape["points"]) < 3:
                parts.append(self._row("part", pl["json_name"], upstream.record_id, upstream.key, "degenerate_polygon",
                                       f"shapes[{i}] ({shape['label']!r}) has {len(shape['points'])} points (need >= 3)",
                                       part_id=f"shapes[{i}]"))
                continue
            shapes.append(shape)
        label = lisa_label_map(shapes, h, w)
        target = label == TARGET_VALUE
        if not target.any():
            raise RecordRejected("empty_mask", f"{pl['json_name']}: no target pixel (no target shape, or ignore shapes cover it)")
        rle = masks.encode(target)
        ignore = label == IGNORE_VALUE
        texts = list(pl["text"])
        segment = Segment(id=0, rle=rle, bbox=masks.bbox(rle), area=float(masks.area(rle)), phrase_index=0,
                          category_name="target")
        record = Record(
            key=upstream.key,
            task=self.task,
            source=Source(corpus=self.name, split=pl["split"], upstream_ids={"image": pl["stem"]},
                          annotation_file=pl["json_name"], annotation_sha256=pl["json_sha256"]),
            image=image,
            segments=[segment],
            ignore=masks.encode(ignore) if ignore.any() else None,
            phrases=texts,
            meta={
                "is_sentence": pl["is_sentence"],
                "explanations": [pl["explanation"]] * len(texts),
                "phrase_segments": [[0] for _ in texts],
                "annotation_encoding": pl["encoding"],
            },
        )
        return Converted(record=record, image_bytes=data, parts=parts)


CONVERTER_CLASSES = (ReasonSeg,)
