"""Build larger or broken upstream inputs FROM the real samples in the corpora folder.

Every builder copies real upstream bytes (the COCO val2017 image 439180, its panoptic PNG, the real
polygons of image 39769) under new ids, so tests exercise the converters at more than one record
without inventing annotation content.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

PAN_ID = 439180


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def build_panoptic(corpora: Path, out: Path, n: int) -> dict[str, Path]:
    """A COCO panoptic layout with `n` copies of the real sample under image ids 1..n."""
    src = corpora / "coco_panoptic"
    doc = load_json(src / "annotations" / "panoptic_val2017.json")
    image0, ann0 = doc["images"][0], doc["annotations"][0]
    images_dir = out / "val2017"
    masks_dir = out / "annotations" / "panoptic_val2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    jpg = (src / "val2017" / f"{PAN_ID:012d}.jpg").read_bytes()
    png = (src / "annotations" / "panoptic_val2017" / f"{PAN_ID:012d}.png").read_bytes()
    doc["images"], doc["annotations"] = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}"
        (images_dir / f"{name}.jpg").write_bytes(jpg)
        (masks_dir / f"{name}.png").write_bytes(png)
        doc["images"].append({**image0, "id": i, "file_name": f"{name}.jpg"})
        doc["annotations"].append({**copy.deepcopy(ann0), "image_id": i, "file_name": f"{name}.png"})
    annotations = out / "annotations" / "panoptic_val2017.json"
    annotations.write_text(json.dumps(doc))
    return {"images": images_dir, "annotations": annotations, "masks": masks_dir}


def build_instances(corpora: Path, out: Path, n: int) -> dict[str, Path]:
    """A COCO instances layout with `n` copies of the real polygon sample (image 39769)."""
    src = corpora / "coco_instances_polygons"
    doc = load_json(src / "annotations" / "instances_val2017.json")
    image0 = doc["images"][0]
    anns0 = doc["annotations"]
    images_dir = out / "val2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    png = (src / "val2017" / image0["file_name"]).read_bytes()
    doc["images"], doc["annotations"] = [], []
    next_ann = 1
    for i in range(1, n + 1):
        name = f"{i:012d}.png"
        (images_dir / name).write_bytes(png)
        doc["images"].append({**image0, "id": i, "file_name": name})
        for ann in anns0:
            doc["annotations"].append({**copy.deepcopy(ann), "image_id": i, "id": next_ann})
            next_ann += 1
    annotations = out / "annotations" / "instances_val2017.json"
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(doc))
    return {"images": images_dir, "annotations": annotations}


def copy_tree_files(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset folder except the run logs, for byte-identity comparisons."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith("logs/")
    }
