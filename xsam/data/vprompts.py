"""Visual prompts (`<region>`) of intseg/vgdseg: seeded generation (COCO-VGD) and rasterisation.

X-SAM generates COCO-VGD prompts with the unseeded global `random`, in a multiprocess pool, once
(`xsam/xsam/dataset/utils/vprompt.py`, spec §1.4 and §7 pitfall 5). Here the same procedure runs
with a private `random.Random(seed)` per (record key, annotation id, kind), `seed = prompt_seed(...)`
(sha256-derived), and what is stored is the GEOMETRY (points, strokes, boxes), not a raster, so the
loader rasterises at load time with `rasterise_prompt`.

The procedure, as read from X-SAM (parameters: min_area 5, max_retries 1000, point radius 10,
scribble radius 5): the instance mask is split into 8-connected components with area > min_area
(skimage `label` + `regionprops`), and every component gets
- point: centroid + an offset (u1·cos a, u2·sin a), u1, u2 ~ U(0, r), a ~ U(0, 2π), r = half the
  component's smaller bbox side; truncated to int, clipped to the bbox; retried until it lands on the
  mask; rasterised as a disc (distance <= 10);
- scribble: a box around the centroid with sides scaled by U(0.5, 1.2) each, retried until its IoU
  with the component box is >= 0.5; a Bresenham line between a random corner and the opposite one,
  rows displaced by amplitude·sin(2π·frequency·t + phase) (amplitude U(10, 20), frequency U(0.2, 1),
  phase U(0, 2π)); rasterised with discs of radius 5;
- box: the component box scaled by U(0.9, 1.1) about its centre, filled;
- mask: the whole instance mask, Gaussian-blurred (σ = 2) and thresholded at the blurred image's
  mean (deterministic: no seed needed; stored as RLE by the converters).
Geometry uses image pixels, x = column, y = row; boxes are [x0, y0, x1, y1) (end exclusive).

Same bits on every machine: the sines, cosines and the Gaussian's exponential of generation and
rasterisation are `det_sin`, `det_cos`, `det_exp` below, polynomials evaluated with IEEE-754 +, -, *,
/ and rint only (each correctly rounded everywhere), not the platform's libm or numpy's SIMD
transcendental kernels, whose last bit differs between CPUs and builds; a last-bit difference can
move a truncated pixel coordinate, so a dataset converted on one machine and rasterised on another
would not be byte- and pixel-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

import numpy as np

from xsam.data import masks
from xsam.data.schema import VisualPrompt

KINDS = ("point", "scribble", "box", "mask")
POINT_RADIUS = 10
SCRIBBLE_RADIUS = 5
MIN_AREA = 5
MAX_RETRIES = 1000
MASK_SIGMA = 2.0
GENERATOR = "x-sam-vprompt-v2"  # v2: det_sin/det_cos instead of libm (same procedure and draws)


_PI = 3.141592653589793
_HALF_PI = 1.5707963267948966
_TWO_PI = 6.283185307179586
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's split of ln 2
# 1/(2k+1)! for sin (x, x^3, ..., x^21) and 1/k! for exp (1, x, ..., x^14), highest degree first
_SIN_COEFFS = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(10, -1, -1))
_EXP_COEFFS = tuple(1 / math.factorial(k) for k in range(14, -1, -1))


def _horner(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out = out * x + c  # two ufuncs: a multiply and an add, never fused
    return out


def det_sin(x: Any) -> Any:
    """sin(x), the same bits on every IEEE-754 machine (see the module doc): reduce by 2π to [-π, π],
    fold to [-π/2, π/2], then the Taylor polynomial to x^21 (truncation error below 1e-19 there).
    Within 2 ulp on [-π/2, π/2]; the one-step reduction adds ~1e-16·|x| absolute error, fine for the
    angles of a few turns used here. Floats in, float out; arrays in, float64 array out."""
    a = np.asarray(x, dtype=np.float64)
    r = a - np.rint(a / _TWO_PI) * _TWO_PI
    r = np.where(r > _HALF_PI, _PI - r, r)
    r = np.where(r < -_HALF_PI, -_PI - r, r)
    out = r * _horner(_SIN_COEFFS, r * r)
    return float(out) if out.ndim == 0 else out


def det_cos(x: Any) -> Any:
    """cos(x) = sin(x + π/2), by `det_sin` (same bits on every machine)."""
    return det_sin(np.asarray(x, dtype=np.float64) + _HALF_PI)


def det_exp(x: Any) -> Any:
    """exp(x) within ~2 ulp for -700 < x < 700, the same bits on every IEEE-754 machine: x = k ln2 + r,
    |r| <= ln2/2, the Taylor polynomial of exp(r) to r^14, times 2^k (exact)."""
    a = np.asarray(x, dtype=np.float64)
    k = np.rint(a / _LN2_HI)
    r = (a - k * _LN2_HI) - k * _LN2_LO
    out = np.ldexp(_horner(_EXP_COEFFS, r), k.astype(np.int32))
    return float(out) if out.ndim == 0 else out


def prompt_seed(record_key: str, annotation_id: int, kind: str) -> int:
    """The seed of one generated prompt: a pure function of (record key, annotation id, kind)."""
    payload = json.dumps(
        [str(record_key), int(annotation_id), str(kind)], separators=(",", ":")
    )
    return (
        int.from_bytes(hashlib.sha256(payload.encode("utf-8")).digest()[:8], "big") >> 1
    )


# ------------------------------------------------------------------------------------ components


def components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[dict[str, Any]]:
    """8-connected components with area > min_area, in raster order of their first pixel (as
    skimage's `label`): each {"bbox": (min_row, min_col, max_row, max_col) end-exclusive,
    "centroid": (row, col), "area": n}."""
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    row_first: list[int] = []
    for r in range(mask.shape[0]):
        row_first.append(len(runs))
        line = np.concatenate(([0], mask[r].astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(line))
        for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            runs.append((r, s, e))
    row_first.append(len(runs))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, mask.shape[0]):
        prev = range(row_first[r - 1], row_first[r])
        for i in range(row_first[r], row_first[r + 1]):
            _, s, e = runs[i]
            for j in prev:
                _, ps, pe = runs[j]
                if ps <= e and s <= pe:  # overlap or diagonal touch (8-connectivity)
                    a, b = find(i), find(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    comps: dict[int, dict[str, Any]] = {}
    for i, (r, s, e) in enumerate(runs):
        root = find(i)
        c = comps.setdefault(
            root,
            {
                "first": i,
                "area": 0,
                "sr": 0.0,
                "sc": 0.0,
                "r0": r,
                "c0": s,
                "r1": r,
                "c1": e,
            },
        )
        n = e - s
        c["area"] += n
        c["sr"] += r * n
        c["sc"] += (s + e - 1) * n / 2
        c["r1"] = max(c["r1"], r)
        c["c0"], c["c1"] = min(c["c0"], s), max(c["c1"], e)
    out = []
    for c in sorted(comps.values(), key=lambda c: c["first"]):
        if c["area"] > min_area:
            out.append(
                {
                    "bbox": (c["r0"], c["c0"], c["r1"] + 1, c["c1"]),
                    "centroid": (c["sr"] / c["area"], c["sc"] / c["area"]),
                    "area": c["area"],
                }
            )
    return out


def _iou_inclusive(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of (min_row, min_col, max_row, max_col) boxes with X-SAM's inclusive (+1) convention."""
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    inter = iw * ih
    area_a = (a[3] - a[1] + 1) * (a[2] - a[0] + 1)
    area_b = (b[3] - b[1] + 1) * (b[2] - b[0] + 1)
    return inter / float(area_a + area_b - inter)


# ------------------------------------------------------------------------------------ generation


def generate(mask: np.ndarray, kind: str, seed: int) -> dict[str, Any] | None:
    """Geometry of one generated prompt of `kind` for an instance mask (None: nothing to draw).

    `mask` prompts are not generated here (see `mask_prompt`)."""
    rng = random.Random(seed)
    h, w = mask.shape
    props = components(mask)
    if kind == "point":
        points = []
        for p in props:
            r0, c0, r1, c1 = p["bbox"]
            cy, cx = p["centroid"]
            for _ in range(MAX_RETRIES):
                radius = min(r1 - r0, c1 - c0) * 0.5
                angle = rng.uniform(0, 2 * math.pi)
                dy = rng.uniform(0, radius) * det_cos(angle)
                dx = rng.uniform(0, radius) * det_sin(angle)
                y = min(max(int(cy + dy), r0), r1 - 1)
                x = min(max(int(cx + dx), c0), c1 - 1)
                if mask[y, x]:
                    points.append([x, y])
                    break
        return (
            {"generator": GENERATOR, "points": points, "radius": POINT_RADIUS}
            if points
            else None
        )
    if kind == "scribble":
        strokes = []
        for p in props:
            r0, c0, r1, c1 = p["bbox"]
            cy, cx = p["centroid"]
            box = None
            for _ in range(MAX_RETRIES):
                nh = (r1 - r0) * rng.uniform(0.5, 1.2)
                nw = (c1 - c0) * rng.uniform(0.5, 1.2)
                cand = (
                    max(0, int(cy - nh / 2)),
                    max(0, int(cx - nw / 2)),
                    min(h, int(cy + nh / 2)),
                    min(w, int(cx + nw / 2)),
                )
                if _iou_inclusive(cand, (r0, c0, r1, c1)) >= 0.5:
                    box = cand
                    break
            if box is None:
                continue
            nr0, nc0, nr1, nc1 = box
            corners = [(nr0, nc0), (nr0, nc1), (nr1, nc0), (nr1, nc1)]
            start = rng.choice(corners)
            end = (nr1 if start[0] == nr0 else nr0, nc1 if start[1] == nc0 else nc0)
            strokes.append(
                {
                    "start": [start[1], start[0]],
                    "end": [end[1], end[0]],
                    "amplitude": rng.uniform(10, 20),
                    "frequency": rng.uniform(0.2, 1),
                    "phase": rng.uniform(0, 2 * math.pi),
                }
            )
        return (
            {"generator": GENERATOR, "strokes": strokes, "radius": SCRIBBLE_RADIUS}
            if strokes
            else None
        )
    if kind == "box":
        boxes = []
        for p in props:
            r0, c0, r1, c1 = p["bbox"]
            scale = rng.uniform(0.9, 1.1)
            dh, dw = (r1 - r0) * (scale - 1), (c1 - c0) * (scale - 1)
            y0, x0 = max(0, int(r0 - dh / 2)), max(0, int(c0 - dw / 2))
            y1, x1 = min(h, int(r1 + dh / 2)), min(w, int(c1 + dw / 2))
            if y1 > y0 and x1 > x0:
                boxes.append([x0, y0, x1, y1])
        return {"generator": GENERATOR, "boxes": boxes} if boxes else None
    raise ValueError(
        f"cannot generate a {kind!r} prompt geometry (kinds: point, scribble, box)"
    )


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian (truncate 4σ, half-sample symmetric borders: scipy.ndimage's defaults)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = det_exp(-0.5 * (x / sigma) * (x / sigma))
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for k, weight in enumerate(kernel):
            acc += weight * (padded[k : k + n] if axis == 0 else padded[:, k : k + n])
        out = acc
    return out


def mask_prompt(mask: np.ndarray) -> np.ndarray:
    """X-SAM's `mask` prompt: the instance mask blurred (σ 2) and thresholded at its mean."""
    blurred = _gaussian_blur(mask.astype(np.float64), MASK_SIGMA)
    return blurred > blurred.mean()


# ----------------------------------------------------------------------------------- rasterising


def _disc_offsets(radius: int) -> list[tuple[int, int]]:
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy * dy + dx * dx <= radius * radius
    ]


def dilate_disc(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within Euclidean distance `radius` of a set pixel (X-SAM `enhance_with_circles`)."""
    mask = mask.astype(bool)
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    if ys.size == 0:
        return out
    h, w = mask.shape
    for dy, dx in _disc_offsets(int(radius)):
        yy, xx = ys + dy, xs + dx
        keep = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out[yy[keep], xx[keep]] = True
    return out


def bresenham(r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the line from (r0, c0) to (r1, c1), both ends included (as skimage.draw.line)."""
    r, c = r0, c0
    dr, dc = abs(r1 - r0), abs(c1 - c0)
    sr, sc = (1 if r1 - r > 0 else -1), (1 if c1 - c > 0 else -1)
    steep = dr > dc
    if steep:
        r, c, dr, dc, sr, sc = c, r, dc, dr, sc, sr
    d = 2 * dr - dc
    rr, cc = np.zeros(dc + 1, dtype=np.int64), np.zeros(dc + 1, dtype=np.int64)
    for i in range(dc):
        rr[i], cc[i] = (c, r) if steep else (r, c)
        while d >= 0:
            r += sr
            d -= 2 * dc
        c += sc
        d += 2 * dr
    rr[dc], cc[dc] = r1, c1
    return rr, cc


def stroke_pixels(
    stroke: dict[str, Any], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) of one sinusoidal scribble stroke before the radius dilation."""
    (x0, y0), (x1, y1) = stroke["start"], stroke["end"]
    rr, cc = bresenham(int(y0), int(x0), int(y1), int(x1))
    rows = rr.astype(np.float32)
    t = np.linspace(0, 1, len(rr))
    rows += float(stroke["amplitude"]) * det_sin(
        2 * np.pi * float(stroke["frequency"]) * t + float(stroke["phase"])
    )
    rows = np.clip(rows, 0, height - 1).astype(np.int32)
    cols = np.clip(cc.astype(np.float32), 0, width - 1).astype(np.int32)
    return rows, cols


def rasterise_prompt(prompt: VisualPrompt, height: int, width: int) -> np.ndarray:
    """The (height, width) boolean mask of a visual prompt.

    - upstream RLE (COCO-Interactive, X-SAM's pre-generated VGD files, our `mask` prompts): decoded,
      then dilated with a disc when `geometry["dilate_radius"]` is set (X-SAM dilates COCO-Interactive
      point prompts by 10 px and scribbles by 5 px when loading them);
    - generated geometry: points -> discs, strokes -> sinusoidal lines with discs, boxes -> filled.
    """
    geometry = prompt.geometry or {}
    if prompt.rle is not None:
        if tuple(prompt.rle.size) != (height, width):
            raise ValueError(
                f"prompt mask size {list(prompt.rle.size)} != [{height}, {width}]"
            )
        out = masks.decode(prompt.rle)
        radius = geometry.get("dilate_radius")
        return dilate_disc(out, int(radius)) if radius else out
    out = np.zeros((height, width), dtype=bool)
    if prompt.kind == "point":
        for x, y in geometry.get("points", []):
            out[int(y), int(x)] = True
        return dilate_disc(out, int(geometry.get("radius", POINT_RADIUS)))
    if prompt.kind == "scribble":
        for stroke in geometry.get("strokes", []):
            rows, cols = stroke_pixels(stroke, height, width)
            out[rows, cols] = True
        return dilate_disc(out, int(geometry.get("radius", SCRIBBLE_RADIUS)))
    if prompt.kind == "box":
        for x0, y0, x1, y1 in geometry.get("boxes", []):
            out[int(y0) : int(y1), int(x0) : int(x1)] = True
        return out
    raise ValueError(
        f"a {prompt.kind!r} prompt without an RLE cannot be rasterised from geometry"
    )
