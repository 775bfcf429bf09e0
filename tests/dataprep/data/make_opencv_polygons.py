"""Writes opencv_polygons.json: polygons rasterised by REAL OpenCV, the golden masks that
tests/dataprep/test_reasonseg.py compares `dataprep.converters.reasonseg.polygon_raster` against.

OpenCV is not a dependency of this project; run this once, by hand, in a throwaway environment:

    python3 -m venv /tmp/cvenv
    /tmp/cvenv/bin/pip install numpy opencv-python-headless==5.0.0.93
    /tmp/cvenv/bin/python tests/dataprep/data/make_opencv_polygons.py

(the committed file was written with opencv-python-headless 5.0.0.93 and numpy 2.4.6; the cases
come from a seeded numpy Generator, so the same versions give the same file).

Each mask is LISA's `get_mask_from_json` rule for one shape: `cv2.polylines(mask, [pts], True, 1, 1)`
then `cv2.fillPoly(mask, [pts], 1)`, pts int32. Most cases cross the image border (vertices just
outside, far outside, exactly on the lines x = -1, 0, w-1, w and y likewise, or on a rectangle
partly outside, and LabelMe-like outlines of 20-60 points on 100-320 px images), because that is
where OpenCV clips edges before drawing and filling them; the rest are inside the image, or
degenerate (collinear, repeated points, runs of horizontal edges).

File layout: {"opencv": version, "rule": ..., "cases": [{"kind", "width", "height", "points":
[[x, y], ...], "runs": [...]}]}; `runs` are the mask's run lengths in row-major order, alternating
0-runs and 1-runs and starting with a (possibly empty) 0-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).with_name("opencv_polygons.json")
SEED = 20240611
# kind -> number of cases; "inside" and "degenerate" are the only kinds that may stay in the image
KINDS = {"inside": 30, "degenerate": 30, "just_outside": 70, "far_outside": 60, "border_lines": 60,
         "convex_crossing": 40, "rectangle": 20, "very_far": 15, "large_crossing": 12}


def image_size(kind: str, rng: np.random.Generator) -> tuple[int, int]:
    if kind == "large_crossing":
        return int(rng.integers(100, 321)), int(rng.integers(100, 241))
    if rng.random() < 0.15:
        return int(rng.integers(1, 6)), int(rng.integers(1, 6))
    return int(rng.integers(6, 41)), int(rng.integers(6, 41))


def polygon(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(3, 13))
    if kind == "inside":
        p = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], 1)
    elif kind == "degenerate":
        p = np.stack([rng.integers(-w, 2 * w, n), rng.integers(-h, 2 * h, n)], 1)
        pick = rng.integers(3)
        if pick == 0:  # collinear: integer multiples of one step
            p = p[0] + np.outer(rng.integers(-3, 4, n), p[1] - p[0])
        elif pick == 1:  # repeated points
            p = p[np.sort(rng.integers(0, n, n))]
        else:  # horizontal edges: consecutive vertices share y
            p[1::2, 1] = p[0::2, 1][: len(p[1::2])]
    elif kind == "just_outside":
        p = np.stack([rng.integers(-w // 2 - 2, w + w // 2 + 2, n), rng.integers(-h // 2 - 2, h + h // 2 + 2, n)], 1)
    elif kind == "far_outside":
        p = np.stack([rng.integers(-10 * w - 5, 10 * w + 5, n), rng.integers(-10 * h - 5, 10 * h + 5, n)], 1)
    elif kind == "border_lines":
        xs, ys = [-3, -1, 0, w // 2, w - 1, w, w + 2], [-3, -1, 0, h // 2, h - 1, h, h + 2]
        p = np.stack([rng.choice(xs, n), rng.choice(ys, n)], 1)
        free = rng.random(n) < 0.3
        p[free] = np.stack([rng.integers(-w, 2 * w, int(free.sum())), rng.integers(-h, 2 * h, int(free.sum()))], 1)
    elif kind == "convex_crossing":
        cx, cy = rng.uniform(-0.5 * w, 1.5 * w), rng.uniform(-0.5 * h, 1.5 * h)
        radius = rng.uniform(1, 1.5 * max(w, h))
        angle = np.sort(rng.uniform(0, 2 * np.pi, n))
        p = np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1)
    elif kind == "rectangle":
        (x0, x1), (y0, y1) = np.sort(rng.integers(-w, 2 * w, 2)), np.sort(rng.integers(-h, 2 * h, 2))
        p = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif kind == "very_far":  # some vertices up to a million pixels away
        p = np.stack([rng.integers(-w, 2 * w, n), rng.integers(-h, 2 * h, n)], 1)
        far = rng.random(n) < 0.4
        p[far] = rng.integers(-10**6, 10**6, (int(far.sum()), 2))
    elif kind == "large_crossing":  # a LabelMe-like outline of 20-60 points around a centre near the border
        n = int(rng.integers(20, 61))
        cx, cy = rng.uniform(-0.2 * w, 1.2 * w), rng.uniform(-0.2 * h, 1.2 * h)
        angle = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.3, 1.0, n) * rng.uniform(0.2, 0.8) * max(w, h)
        p = np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1)
    else:
        raise ValueError(kind)
    return np.asarray(p, dtype=np.float64).astype(np.int32)


def crosses_border(p: np.ndarray, w: int, h: int) -> bool:
    return bool(((p[:, 0] < 0) | (p[:, 0] >= w) | (p[:, 1] < 0) | (p[:, 1] >= h)).any())


def opencv_mask(p: np.ndarray, w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.polylines(mask, [p], True, 1, 1)
    cv2.fillPoly(mask, [p], 1)
    return mask


def runs(mask: np.ndarray) -> list[int]:
    flat = mask.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    lengths = np.diff(bounds).tolist()
    return lengths if flat[0] == 0 else [0, *lengths]


def main() -> None:
    rng = np.random.default_rng(SEED)
    cases = []
    for kind, count in KINDS.items():
        made = 0
        while made < count:
            w, h = image_size(kind, rng)
            p = polygon(kind, w, h, rng)
            if kind not in ("inside", "degenerate") and not crosses_border(p, w, h):
                continue
            cases.append({"kind": kind, "width": w, "height": h, "points": p.tolist(),
                          "runs": runs(opencv_mask(p, w, h))})
            made += 1
    doc = {"opencv": cv2.__version__, "numpy": np.__version__,
           "rule": "cv2.polylines(m, [pts], True, 1, 1); cv2.fillPoly(m, [pts], 1); pts int32 (x, y)",
           "cases": cases}
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    crossing = sum(crosses_border(np.array(c["points"]), c["width"], c["height"]) for c in cases)
    print(f"wrote {OUT}: {len(cases)} polygons, {crossing} crossing the border, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
