"""Example GCG inputs (GranD-f, OpenPSG-GCG, RefCOCOg-GCG, Flickr-GCG, GranD-f val GT) in their
exact upstream formats, derived from the real COCO samples (see `dataprep/converters/gcg.py`).

Captions are written here from the real category names and box geometry; every mask is a real COCO
instance mask (polygons rasterised by pycocotools, or the real RLE), merged by union where one
phrase names several instances. Deterministic: the same call writes the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

POLY_DIR = "coco_instances_polygons"
RLE_DIR = "coco_instances"
CATS = "000000039769.png"  # 2 cats, couch, bed, 2 remotes (polygons)
HORSES = "000000439180.jpg"  # people on horses, trucks, gravel, trees, sky (RLE)

README = """# GCG example inputs (DERIVED, not real GCG files)

No real GranD-f / OpenPSG-GCG / RefCOCOg-GCG / Flickr-GCG / GranD-f val-test file is available here.
These files are DERIVED by `dataprep/examples/gcg.py` from the real COCO samples:

- `{poly}/val2017/{cats}` (COCO val2017 image 39769, 6 real polygon annotations) and
- `{rle}/val2017/{horses}` with `{rle}/annotations/panoptic_coco_detection_format.json`
  (COCO val2017 image 439180, 32 real RLE annotations).

The image bytes are copied unchanged. The CAPTIONS and PHRASES were WRITTEN BY HAND from the real
category names and box positions; the character spans point at those phrases; every mask is a real
COCO instance mask (polygons rasterised with pycocotools `frPyObjects` + `merge`, or the real RLE);
where a phrase names several instances ("two cats", "people") its `rle_masks` list them all
(GranD-f/PSG), or the mask is their union (Flickr `sam_mask`, eval mask GT). File names follow each
upstream release (`GranDf/annotations/train/...`, `val_test/...`), but the images keep their COCO
file names (the real GranD-f images are `sa_*.jpg`, Flickr ones `<flickr id>.jpg`).

| folder | upstream file | format |
|---|---|---|
| grandf/ | GranDf_HA_GCG_train.json | list of {{image_id, file_name, caption, groundings{{phrase: {{token_positives, rle_masks}}}}}} |
| psg/ | OpenPsgGCG_train.json | same as GranD-f |
| refcocog/ | RefCOCOg_GCG_train.json | list of {{id: {{img_file_name, caption, refs[{{sentence, segmentation}}]}}}} |
| flickr/ | flickr_mergedGT_GCG_train.json | COCO: images[].caption, annotations[].tokens_positive, sam_mask |
| eval/ | val_test/val_gcg_coco_{{mask,caption}}_gt.json | COCO instances (category 1) + COCO captions with labels |
"""


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _rle_json(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write(path: Path, data: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return str(path)


def _span(caption: str, phrase: str, after: int = 0) -> list[int]:
    start = caption.index(phrase, after)
    return [start, start + len(phrase)]


class _Sample:
    """The real masks of one COCO image, by category name (instances in annotation-id order)."""

    def __init__(self, ann_file: Path, file_name: str) -> None:
        data = _load(ann_file)
        image = next(i for i in data["images"] if i["file_name"] == file_name)
        self.image = image
        self.h, self.w = image["height"], image["width"]
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.anns = sorted((a for a in data["annotations"] if a["image_id"] == image["id"]), key=lambda a: a["id"])
        for a in self.anns:
            a["name"] = names[a["category_id"]]

    def pick(self, name: str, *, crowd: bool = False) -> list[dict[str, Any]]:
        return [a for a in self.anns if a["name"] == name and (crowd or not a["iscrowd"])]

    def mask(self, ann: dict[str, Any]) -> np.ndarray:
        seg = ann["segmentation"]
        if isinstance(seg, list):
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, self.h, self.w))).astype(bool)
        return mask_utils.decode(seg).astype(bool)

    def rle(self, ann: dict[str, Any]) -> dict[str, Any]:
        return _rle_json(self.mask(ann))

    def union(self, anns: list[dict[str, Any]]) -> dict[str, Any]:
        out = np.zeros((self.h, self.w), dtype=bool)
        for a in anns:
            out |= self.mask(a)
        return _rle_json(out)


def _groundings(caption: str, sample: _Sample, spec: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out, cursor = {}, 0
    for phrase, anns in spec:
        span = _span(caption, phrase, cursor)
        cursor = span[1]
        out[phrase] = {"token_positives": span, "rle_masks": [sample.rle(a) for a in anns]}
    return out


def build(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    corpora, out = Path(corpora), Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "README.md").write_text(README.format(poly=POLY_DIR, rle=RLE_DIR, cats=CATS, horses=HORSES))
    cats = _Sample(corpora / POLY_DIR / "annotations" / "instances_val2017.json", CATS)
    horses = _Sample(corpora / RLE_DIR / "annotations" / "panoptic_coco_detection_format.json", HORSES)
    cat_png = corpora / POLY_DIR / "val2017" / CATS
    horse_jpg = corpora / RLE_DIR / "val2017" / HORSES
    found: dict[str, dict[str, str]] = {}

    def images(folder: Path, *files: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
        return str(folder)

    # GranD-f: two images, several masks per phrase.
    c1 = "Two cats lie on a pink couch next to two remotes."
    c2 = "People ride horses on a gravel field in front of trees under the sky."
    grandf = [
        {"image_id": 39769, "file_name": CATS, "caption": c1, "groundings": _groundings(c1, cats, [
            ("Two cats", cats.pick("cat")), ("a pink couch", cats.pick("couch")), ("two remotes", cats.pick("remote"))])},
        {"image_id": 439180, "file_name": HORSES, "caption": c2, "groundings": _groundings(c2, horses, [
            ("People", horses.pick("person")), ("horses", horses.pick("horse")), ("a gravel field", horses.pick("gravel")),
            ("trees", horses.pick("tree-merged")), ("the sky", horses.pick("sky-other-merged"))])},
    ]
    root = out / "grandf"
    found["gcg-grandf"] = {
        "flavor": "grandf",
        "annotations": _write(root / "GranDf" / "annotations" / "train" / "GranDf_HA_GCG_train.json", grandf),
        "images": images(root / "GranDf_HA_images" / "train", cat_png, horse_jpg),
    }

    # OpenPSG-GCG: same format, COCO 2017 images.
    c3 = "A group of people riding horses next to two trucks on the grass."
    psg = [{"image_id": 439180, "file_name": HORSES, "caption": c3, "groundings": _groundings(c3, horses, [
        ("A group of people", horses.pick("person")), ("horses", horses.pick("horse")),
        ("two trucks", horses.pick("truck")), ("the grass", horses.pick("grass-merged"))])}]
    root = out / "psg"
    found["gcg-psg"] = {
        "flavor": "psg",
        "annotations": _write(root / "GranDf" / "annotations" / "train" / "OpenPsgGCG_train.json", psg),
        "images": images(root / "coco_2017" / "train2017", horse_jpg),
    }

    # RefCOCOg-GCG: refs with polygon segmentations, spans found by the converter.
    left, right = sorted(cats.pick("cat"), key=lambda a: a["bbox"][0])
    c4 = "A cat sleeping on the left and a cat lying on the right share a pink couch with two remotes."
    refs = [
        {"sentence": "a cat sleeping on the left", "segmentation": left["segmentation"]},
        {"sentence": "a cat lying on the right", "segmentation": right["segmentation"]},
        {"sentence": "a pink couch", "segmentation": cats.pick("couch")[0]["segmentation"]},
    ]
    refcocog = [{"39769": {"img_file_name": CATS, "caption": c4, "refs": refs}}]
    root = out / "refcocog"
    found["gcg-refcocog"] = {
        "flavor": "refcocog",
        "annotations": _write(root / "GranDf" / "annotations" / "train" / "RefCOCOg_GCG_train.json", refcocog),
        "images": images(root / "coco_2014" / "train2014", cat_png),
    }

    # Flickr-GCG (mergedGT): one annotation per phrase, sam_mask = union of its instances.
    c5 = "A man rides a horse near two trucks."
    man = [a for a in horses.pick("person") if a["id"] == 18]
    horse = [a for a in horses.pick("horse") if a["id"] == 34]
    trucks = horses.pick("truck")
    flickr_anns = []
    for n, (phrase, anns) in enumerate([("A man", man), ("a horse", horse), ("two trucks", trucks)]):
        rle = horses.union(anns)
        bbox = [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})]
        flickr_anns.append({
            "id": 1000 + n, "image_id": 439180, "category_id": 1, "iscrowd": 0, "bbox": bbox,
            "area": int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})),
            "tokens_positive": [_span(c5, phrase)], "phrase_ids": n, "sam_mask": rle,
        })
    flickr = {
        "images": [{"id": 439180, "file_name": HORSES, "height": horses.h, "width": horses.w, "caption": c5}],
        "annotations": flickr_anns,
        "categories": [{"id": 1, "name": "object"}],
    }
    root = out / "flickr"
    found["gcg-flickr"] = {
        "flavor": "flickr",
        "annotations": _write(root / "GranDf" / "annotations" / "train" / "flickr_mergedGT_GCG_train.json", flickr),
        "images": images(root / "flikcr_30k" / "train", horse_jpg),
    }

    # GranD-f val GT: COCO instances (one category "object") + COCO captions with labels.
    stem = HORSES.rsplit(".", 1)[0]
    c6 = "Riders on horses gather on a gravel field in front of trees."
    labels = ["Riders", "horses", "a gravel field", "trees"]
    groups = [horses.pick("person"), horses.pick("horse"), horses.pick("gravel"), horses.pick("tree-merged")]
    mask_anns = []
    for n, anns in enumerate(groups):
        rle = horses.union(anns)
        coco = {"size": rle["size"], "counts": rle["counts"].encode()}
        mask_anns.append({
            "id": n + 1, "image_id": stem, "category_id": 1, "segmentation": rle, "iscrowd": 0,
            "bbox": [float(v) for v in mask_utils.toBbox(coco)], "area": int(mask_utils.area(coco)),
        })
    mask_gt = {
        "images": [{"id": stem, "file_name": HORSES, "height": horses.h, "width": horses.w}],
        "annotations": mask_anns,
        "categories": [{"id": 1, "name": "object"}],
    }
    cap_gt = {
        "images": [{"id": stem, "file_name": HORSES, "height": horses.h, "width": horses.w}],
        "annotations": [{"id": 1, "image_id": stem, "caption": c6, "labels": labels}],
    }
    root = out / "eval"
    _write(root / "GranDf" / "annotations" / "val_test" / "val_gcg_coco_caption_gt.json", cap_gt)
    found["gcg-eval"] = {
        "flavor": "eval",
        "annotations": _write(root / "GranDf" / "annotations" / "val_test" / "val_gcg_coco_mask_gt.json", mask_gt),
        "images": images(root / "GranDf_HA_images" / "val_test", horse_jpg),
    }
    return found
