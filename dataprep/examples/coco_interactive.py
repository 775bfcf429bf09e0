"""Example COCO-Interactive input DERIVED from the real COCO samples (no real PSALM file is here).

`build(corpora, out)` writes `out/coco_int/annotations/coco_interactive_val_psalm.json` and
`out/coco_int/val2017/` (real image bytes copied) for COCO val2017 images 39769 (real polygons,
corpora/coco_instances_polygons) and 439180 (real RLE incl. 2 crowds, corpora/coco_instances).
Every annotation, crowd ones included (as PSALM's builder script writes them), gets the four prompt
masks, DERIVED from its real instance mask:
point = disc of radius 10 at the mask's centroid pixel (the mask pixel nearest the centroid),
scribble = the 1-px horizontal line of mask pixels on that pixel's row, box = the filled bbox
rectangle of the mask, mask = the mask; all as compressed RLE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

CORPUS = "coco-interactive"
FILE = "coco_interactive_val_psalm.json"
SOURCES = (
    ("coco_instances_polygons", "instances_val2017.json", 39769),
    ("coco_instances", "panoptic_coco_detection_format.json", 439180),
)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": rle["counts"].decode("ascii"),
    }


def instance_mask(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        return mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        ).astype(bool)
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.decode(seg).astype(bool)


def derived_prompts(mask: np.ndarray) -> dict[str, dict]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    py, px = int(ys[i]), int(xs[i])
    yy, xx = np.ogrid[:h, :w]
    point = (yy - py) ** 2 + (xx - px) ** 2 <= 100
    scribble = np.zeros_like(mask)
    scribble[py] = mask[py]
    box = np.zeros_like(mask)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return {
        "point_visual_prompt_mask": _rle(point),
        "scribble_visual_prompt_mask": _rle(scribble),
        "box_visual_prompt_mask": _rle(box),
        "mask_visual_prompt_mask": _rle(mask),
    }


def build(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    root = Path(out) / "coco_int"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    records = []
    for folder, ann_file, image_id in SOURCES:
        doc = json.loads(
            (Path(corpora) / folder / "annotations" / ann_file).read_text()
        )
        img = next(i for i in doc["images"] if i["id"] == image_id)
        shutil.copyfile(
            Path(corpora) / folder / "val2017" / img["file_name"],
            root / "val2017" / img["file_name"],
        )
        h, w = img["height"], img["width"]
        anns = []
        for a in sorted(
            (a for a in doc["annotations"] if a["image_id"] == image_id),
            key=lambda a: a["id"],
        ):
            entry = {
                k: a[k]
                for k in ("id", "category_id", "bbox", "iscrowd", "segmentation")
            }
            entry.update(derived_prompts(instance_mask(a["segmentation"], h, w)))
            anns.append(entry)
        info = {"id": image_id, "file_name": img["file_name"], "height": h, "width": w}
        records.append({"image": img["file_name"], "image_info": info, "anns": anns})
    (root / "annotations" / FILE).write_text(json.dumps(records, separators=(",", ":")))
    (Path(out) / "README.md").write_text(
        "# COCO-Interactive example (DERIVED)\n\n"
        + (__doc__ or "")
        + "\nThe PSALM file has no category table: pass a COCO instances file with --instances for names.\n"
    )
    return {
        CORPUS: {
            "annotations": str(root / "annotations" / FILE),
            "images": str(root / "val2017"),
        }
    }
