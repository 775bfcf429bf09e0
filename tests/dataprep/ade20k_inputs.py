"""Test inputs for the ADE20K converter, BUILT FROM REAL COCO MASKS (not a test module).

No real ADE20K annotation PNG is available here (see /work/shared/corpora/PROVENANCE.md, "ade20k/":
only two test-split JPEGs and the class tables). So this module builds an ADEChallengeData2016
layout from the real COCO panoptic sample (val2017 image 439180, 640x360: its JPEG and its panoptic
PNG, id = R + 256 G + 256^2 B, with `segments_info`):

- semantic PNG (`annotations/<split>/ADE_*.png`, uint8, mode L): each COCO segment's pixels get the
  ADE-150 id of its COCO category through the explicit table `COCO_TO_ADE` below; void pixels and
  unmapped categories (gravel) get 0 = "other". Crowd segments keep their class here (as a thing
  class without instance: ADE also has thing-class pixels no instance covers);
- instance PNG (`annotations_instance/<split>/ADE_*.png`, RGB): every non-crowd COCO segment whose
  ADE class is one of the 100 instance classes becomes one instance: R = its instance class (the
  inverse of ade20k_instance_catid_mapping.txt), G = 1..n in `segments_info` order, B = 0;
- with `grow=True` (one deliberate, documented edit) the first truck instance is extended to every
  not-yet-instance pixel of its bounding box, so that a thing overlaps semantic pixels of other
  classes and of "other" (ADE's semantic and instance annotations overlap like that; Mask2Former
  pastes things over stuff for that reason);
- the image (`images/<split>/ADE_*.jpg`) is the COCO JPEG, byte for byte.

`reference_panoptic` is an independent, per-instance reading of Mask2Former's
`datasets/prepare_ade20k_pan_seg.py` rule (stuff from the semantic map for non-thing classes, one
thing per instance id, things pasted after stuff), with the converter's quarantine rules; tests
compare the converter's records with it pixel-exactly.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import (
    CORPORA,  # ../shared/corpora, or the shipped copy in examples/corpora
)
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "dataprep" / "data" / "ade20k"
COCO_PANOPTIC = CORPORA / "coco_panoptic"
COCO_IMAGE = COCO_PANOPTIC / "val2017" / "000000439180.jpg"
COCO_PNG = COCO_PANOPTIC / "annotations" / "panoptic_val2017" / "000000439180.png"
COCO_JSON = COCO_PANOPTIC / "annotations" / "panoptic_val2017.json"

# COCO category name -> ADE SceneParsing-150 id (object150_info.csv `Idx`); anything else -> 0.
COCO_TO_ADE = {
    "person": 13,  # person;individual;... (instance class 4)
    "truck": 84,  # truck;motortruck (instance class 53)
    "horse": 127,  # animal;animate;being;... (instance class 82)
    "tree-merged": 5,  # tree: Stuff=0 in the csv, but not an instance class -> stuff
    "sky-other-merged": 3,  # sky
    "grass-merged": 10,  # grass
}


def instance_mapping() -> dict[int, int]:
    """ade20k_instance_catid_mapping.txt: {instance class 1..100: SceneParse150 id}."""
    rows = (line.split() for line in (TABLES / "ade20k_instance_catid_mapping.txt").read_text().splitlines()[1:])
    return {int(r[0]): int(r[1]) for r in rows if r}


def class_names() -> dict[int, str]:
    """ade20k_150_names.tsv: {id: display name} (object150_info.csv's words, spaces restored)."""
    lines = (TABLES / "ade20k_150_names.tsv").read_text().splitlines()[1:]
    return {int(line.split("\t")[0]): line.split("\t")[1] for line in lines if line}


@dataclass
class Instance:
    index: int  # G value
    instance_class: int  # R value
    category_id: int  # 1..150 (for a valid instance class), else 0
    mask: np.ndarray


@dataclass
class AdeTruth:
    """One image of the built layout: the arrays written as PNGs and what they mean."""

    stem: str
    image: bytes  # JPEG bytes
    semantic: np.ndarray  # (H, W) uint8, 0 = other, 1..150
    instance: np.ndarray  # (H, W, 3) uint8, R = instance class, G = instance id

    @property
    def instances(self) -> list[Instance]:
        mapping = instance_mapping()
        out = []
        for g in sorted(set(np.unique(self.instance[..., 1]).tolist()) - {0}):
            mask = self.instance[..., 1] == g
            rs = np.unique(self.instance[..., 0][mask]).tolist()
            out.append(Instance(g, rs[0] if len(rs) == 1 else -1, mapping.get(rs[0], 0) if len(rs) == 1 else 0, mask))
        return out


def coco_truth(stem: str = "ADE_val_00000001", *, grow: bool = True) -> AdeTruth:
    """The real COCO sample as an ADE image (see the module docstring)."""
    doc = json.loads(COCO_JSON.read_bytes())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    (ann,) = doc["annotations"]
    rgb = np.asarray(PILImage.open(COCO_PNG).convert("RGB"), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    inverse = {s: i for i, s in instance_mapping().items()}
    semantic = np.zeros(ids.shape, np.uint8)
    instance = np.zeros((*ids.shape, 3), np.uint8)
    g = 0
    for seg in ann["segments_info"]:
        ade = COCO_TO_ADE.get(names[seg["category_id"]], 0)
        mask = ids == seg["id"]
        semantic[mask] = ade
        if ade in inverse and not seg["iscrowd"]:
            g += 1
            instance[mask, 0] = inverse[ade]
            instance[mask, 1] = g
    if grow:
        truck = next(k for k in range(1, g + 1) if instance[..., 0][instance[..., 1] == k][0] == inverse[84])
        ys, xs = np.nonzero(instance[..., 1] == truck)
        box = np.zeros(ids.shape, bool)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        grown = box & (instance[..., 1] == 0)
        instance[grown, 0] = inverse[84]
        instance[grown, 1] = truck
    return AdeTruth(stem=stem, image=COCO_IMAGE.read_bytes(), semantic=semantic, instance=instance)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_release(root: Path, truths: list[AdeTruth], split: str = "validation") -> Path:
    """Write `root/{images,annotations,annotations_instance}/<split>/<stem>.{jpg,png}`."""
    for sub in ("images", "annotations", "annotations_instance"):
        (root / sub / split).mkdir(parents=True, exist_ok=True)
    for t in truths:
        (root / "images" / split / f"{t.stem}.jpg").write_bytes(t.image)
        (root / "annotations" / split / f"{t.stem}.png").write_bytes(png_bytes(t.semantic))
        (root / "annotations_instance" / split / f"{t.stem}.png").write_bytes(png_bytes(t.instance))
    return root


@dataclass
class RefSegment:
    category_id: int  # 1..150
    isthing: bool
    mask: np.ndarray
    instance: Instance | None = None  # the instance of a thing


@dataclass
class RefPanoptic:
    """Mask2Former's panoptic reading of an `AdeTruth`, plus the converter's extra outputs."""

    stuff: dict[int, RefSegment] = field(default_factory=dict)  # category id -> segment
    things: list[RefSegment] = field(default_factory=list)  # valid instances, in G order
    skipped: dict[int, str] = field(default_factory=dict)  # G -> quarantine reason
    ignore: np.ndarray | None = None  # semantic 0 (and values > 150)
    label: np.ndarray | None = None  # (H, W) panoptic class per pixel, 0 = none


def reference_panoptic(t: AdeTruth) -> RefPanoptic:
    mapping = instance_mapping()
    thing_classes = set(mapping.values())
    ref = RefPanoptic()
    ref.ignore = (t.semantic == 0) | (t.semantic > 150)
    label = np.zeros(t.semantic.shape, np.int32)
    for c in sorted(set(np.unique(t.semantic).tolist()) - {0}):
        if c <= 150 and c not in thing_classes:
            label[t.semantic == c] = c
    for inst in t.instances:
        if inst.instance_class == -1:
            ref.skipped[inst.index] = "invalid_annotation"
        elif inst.instance_class not in mapping:
            ref.skipped[inst.index] = "unknown_category"
        else:
            label[inst.mask] = inst.category_id
            ref.things.append(RefSegment(inst.category_id, True, inst.mask, inst))
    thing_pixels = np.zeros(t.semantic.shape, bool)
    for seg in ref.things:
        thing_pixels |= seg.mask
    for c in sorted(set(np.unique(label[~thing_pixels]).tolist()) - {0}):
        ref.stuff[c] = RefSegment(c, False, (label == c) & ~thing_pixels)
    ref.label = label
    return ref
