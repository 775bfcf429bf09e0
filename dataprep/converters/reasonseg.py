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
`fillPoly`/`polylines` do for one contour with `lineType=LINE_8`, `shift=0` (rules read from
OpenCV's `imgproc/src/drawing.cpp`: `clipLine`, `LineIterator`, `CollectPolyEdges`,
`FillEdgeCollection`):
- an edge v[i-1] -> v[i] with an end point outside the image is clipped first (`clipLine`, one
  pass: end points with y outside move to y = 0 or h-1, then those with x outside to x = 0 or w-1,
  each intercept computed in double and truncated, the second end point moved along the line
  through the already moved first one); a segment that misses the image is not drawn, but the end
  points moved so far are kept for the fill;
- the (clipped) edge is drawn with OpenCV's 8-connected `LineIterator` Bresenham walk, started at
  the left end point (`err = dx - 2 dy`, minor step while `err < 0`; evaluated in closed form);
  `polylines` draws exactly these lines again;
- the interior is `FillEdgeCollection`'s scan conversion: each non-horizontal edge is active on its
  own rows `y0 <= y < y1` (of the unclipped vertices) with x in 16.16 fixed point,
  `x = x_ref + (y - y_ref) dx`, `dx = ((xb - xa) << 16) / (yb - ya)` truncated toward zero. For an
  edge inside the image (xa, ya), (xb, yb) are its vertices; otherwise x comes from the clipped end
  points and y too, unless clipping left them on one row (then the vertices' y): the clipped
  slope, extrapolated to the edge's whole row range. Per row the active x are sorted and paired,
  and pixels `ceil(x_a) .. floor(x_b)` are filled, clipped to the image.
Exactness: pixel-equal to real `cv2.polylines` + `cv2.fillPoly` (opencv-python-headless 5.0.0.93,
in a throwaway environment, not a dependency) on every one of 64,000 random polygons (3-12
vertices, 4,000 of them 3-200; convex, non-convex, self-intersecting; vertices inside, just
outside, on the lines x = -1, 0, w-1, w / y likewise, up to 10^6 px away; collinear, repeated
points, horizontal edges; images 1x1 to 500x500; most of them cross the border), on 30 more with
vertices at up to +-(2^31 - 1), and on the 6 real COCO polygons of image 39769. The tests replay
337 such polygons (307 crossing the border) from masks real OpenCV wrote
(`tests/dataprep/data/opencv_polygons.json`, with the script that regenerates it). OpenCV 4.11,
4.12 and 4.14 draw the same masks as 5.0.0 on that file; 4.8 and 4.10 (LISA pins opencv-python
4.8.0.74) follow an older rule and differ by a few pixels on about a third of polygons, inside the
image too (14 pixels on the example's left cat). X-SAM (`img_reaseg_dataset.py`, the same
polylines + fillPoly calls) pins no OpenCV version (it comes in through its other requirements), so
an install from 2025 on, when 4.11+ was current, draws what we draw; masks from LISA's own pinned
environment can differ from ours by those few pixels. A further test compares against PIL's
`ImageDraw.polygon(outline=...)`, an independent rasteriser whose boundary rule differs: they agree
except on pixels next to the outline.

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
_INACTIVE = np.iinfo(np.int64).max  # x of an edge not active on a row: sorts last
_FILL_CELLS = 1 << 18  # rows x edges evaluated at once by the scan conversion
FIX_SRC = "pass one split folder of the LISA release, e.g. --src ReasonSeg/train (NAME.jpg + NAME.json pairs)"
FIX_EXPL = "pass LISA's explanatory/train.json: a list of {image, query, outputs}"


# ---- OpenCV-equivalent polygon rasterisation (LINE_8, shift 0) ------------------------------


def _trunc_div(num: int, den: int) -> int:
    """C integer division (truncates toward zero), on Python ints."""
    q = abs(num) // abs(den)
    return q if (num >= 0) == (den > 0) else -q


def _clip_line(w: int, h: int, x1: int, y1: int, x2: int, y2: int) -> tuple[int, int, int, int, bool]:
    """OpenCV `clipLine` on an image of size (w, h): the end points moved onto [0, w-1] x [0, h-1]
    and whether the segment touches the image.

    One pass, first y then x, each intercept computed in double and truncated; the second end point
    is moved along the line through the already moved first one. When the segment turns out to miss
    the image the end points may already be moved: `CollectPolyEdges` uses them anyway."""
    if w <= 0 or h <= 0:
        return x1, y1, x2, y2, False
    right, bottom = w - 1, h - 1
    c1 = (x1 < 0) + (x1 > right) * 2 + (y1 < 0) * 4 + (y1 > bottom) * 8
    c2 = (x2 < 0) + (x2 > right) * 2 + (y2 < 0) * 4 + (y2 > bottom) * 8
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int(float(a - y1) * float(x2 - x1) / float(y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int(float(a - y2) * float(x2 - x1) / float(y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int(float(a - x1) * float(y2 - y1) / float(x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int(float(a - x2) * float(y2 - y1) / float(x2 - x1))
                x2 = a
                c2 = 0
    return x1, y1, x2, y2, (c1 | c2) == 0


def _line_pixels(x1: int, y1: int, x2: int, y2: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of OpenCV's 8-connected `LineIterator` walk from (x1, y1) to (x2, y2), started at
    the left end point: one major-axis step per pixel, plus a minor-axis step while `err < 0`
    (err_0 = major - 2 minor; -2 minor per pixel, +2 major per minor step). The minor offset after
    k pixels is then ceil((2 minor k - major) / (2 major)), computed here in closed form."""
    if x2 < x1:
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, y2 - y1
    sy = -1 if dy < 0 else 1
    dy = abs(dy)
    major, minor = max(dx, dy), min(dx, dy)
    k = np.arange(major + 1, dtype=np.int64)
    steps = (2 * minor * k + major - 1) // (2 * major) if major else k
    if dy > dx:
        return x1 + steps, y1 + sy * k
    return x1 + k, y1 + sy * steps


def _fill_spans(out: np.ndarray, edges: np.ndarray) -> None:
    """OpenCV `FillEdgeCollection` into `out` for edges (y0, y1, x at y0 in 16.16, dx per row).

    An edge is active on rows y0 <= y < y1 with x = x_y0 + (y - y0) dx (OpenCV steps it row by row,
    the same integers). Per row OpenCV keeps the active edges sorted by x and fills between the
    1st and 2nd, 3rd and 4th, ...: pixels ceil(x_a) .. floor(x_b), clipped to the image. The x of
    all edges are computed for a block of rows at once (blocks bound the rows x edges memory)."""
    height, width = out.shape
    y_lo = max(int(edges[:, 0].min()), 0)
    y_hi = min(int(edges[:, 1].max()), height)
    y0, y1, x0, dx = (edges[:, i][None, :] for i in range(4))
    pairs = 2 * (len(edges) // 2)  # an even number of edges is active on every row
    block = max(1, _FILL_CELLS // len(edges))
    for top in range(y_lo, y_hi, block):
        n = min(block, y_hi - top)
        rows = np.arange(top, top + n, dtype=np.int64)[:, None]
        xs = np.where((rows >= y0) & (rows < y1), x0 + (rows - y0) * dx, _INACTIVE)
        xs.sort(axis=1)
        left, right = xs[:, 0:pairs:2], xs[:, 1:pairs:2]
        xa = (left >> _XY_SHIFT) + ((left & _LEFT_DELTA) != 0)  # ceil, without overflowing _INACTIVE
        xb = right >> _XY_SHIFT
        used = (left != _INACTIVE) & (xa <= xb) & (xa < width) & (xb >= 0)
        r = np.broadcast_to(rows, used.shape)[used].tolist()
        starts, stops = np.maximum(xa[used], 0).tolist(), (np.minimum(xb[used], width - 1) + 1).tolist()
        for y, a, b in zip(r, starts, stops):  # a slice per span beats any per-pixel pass over the box
            out[y, a:b] = True


def polygon_raster(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: `cv2.polylines(m, [pts], True, 1, 1)` + `cv2.fillPoly(m, [pts], 1)` for one
    int32 contour `points` (N, 2) of (x, y), as OpenCV 8-connected drawing does (see module doc)."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2).tolist()
    out = np.zeros((height, width), dtype=bool)
    line_x: list[np.ndarray] = []
    line_y: list[np.ndarray] = []
    edges: list[tuple[int, int, int, int]] = []
    for i in range(len(pts)):
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        # the edge as drawn: fillPoly draws it, polylines draws the very same pixels again
        cx0, cy0, cx1, cy1, visible = x0, y0, x1, y1, True
        if not (0 <= x0 < width and 0 <= x1 < width and 0 <= y0 < height and 0 <= y1 < height):
            cx0, cy0, cx1, cy1, visible = _clip_line(width, height, x0, y0, x1, y1)
        if visible:
            xs, ys = _line_pixels(cx0, cy0, cx1, cy1)
            line_x.append(xs)
            line_y.append(ys)
        if y0 == y1:
            continue
        # the edge as filled: OpenCV takes x from the clipped end points (moved even when the segment
        # misses the image) and y from them only when they still differ, and extrapolates that
        # slope back to the edge's own rows
        if cy0 == cy1:
            cy0, cy1 = y0, y1
        dx = _trunc_div((cx1 - cx0) << _XY_SHIFT, cy1 - cy0)
        if y0 < y1:
            edges.append((y0, y1, (cx0 << _XY_SHIFT) + (y0 - cy0) * dx, dx))
        else:
            edges.append((y1, y0, (cx1 << _XY_SHIFT) + (y1 - cy1) * dx, dx))
    if len(edges) >= 2:  # a closed contour has none or at least two
        _fill_spans(out, np.array(edges, dtype=np.int64))
    if line_x:
        out[np.concatenate(line_y), np.concatenate(line_x)] = True
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
    version = "2"  # 2: OpenCV-exact fill of polygons crossing the image border
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
