"""ADE20K (SceneParsing-150, ADEChallengeData2016) -> ovseg records: panoptic, semantic, instance views.

X-SAM evaluates ADE20K zero-shot on three views of the validation set (spec §1.4 "ovseg", §5):
panoptic and semantic with the 150 SceneParsing classes, instance with the 100 thing classes, all
prepared by Mask2Former's `datasets/prepare_ade20k_{pan,sem,ins}_seg.py`. One record per image stores
the PANOPTIC segments; the semantic and instance views are derived from it (`xsam.data.views`,
`semantic_label_map` below), as for COCO panoptic, instead of storing three datasets.

Two input layouts:

a. The release, `--root ADEChallengeData2016[.zip|.tar] --split validation|training` (default
   `validation`): `images/<split>/ADE_*.jpg`, `annotations/<split>/ADE_*.png` (semantic, uint8:
   0 = "other" (ignored), 1..150 = the class `Idx` of object150_info.csv) and
   `annotations_instance/<split>/ADE_*.png` (RGB: R = instance class 1..100, G = instance id,
   0 = none). The panoptic segments are built exactly as `prepare_ade20k_pan_seg.py` builds them:
   - stuff: one segment per class present in the semantic map that is NOT a thing class;
   - things: one segment per instance id (G value) of the instance PNG, its class = R mapped to the
     150 ids through ade20k_instance_catid_mapping.txt;
   - things are pasted after stuff, so a thing pixel overrides whatever the semantic map says there;
     thing-class pixels of the semantic map that no instance covers belong to no segment.
   Differences from the upstream script, which asserts and stops the whole run instead:
   - an instance whose pixels carry more than one R value -> part-level `invalid_annotation`;
   - an instance class (R) that the mapping lacks (0 or > 100 under a G > 0) -> part-level
     `unknown_category`;
   - a semantic value above 150 -> part-level `unknown_category`, its pixels join `ignore`;
   - a stuff class whose every pixel is overridden by things -> part-level `empty_mask` (upstream
     lists it with the area of its semantic mask but paints no pixel of it);
   - bbox and area are those of the stored (visible) mask; upstream computes a stuff segment's
     bbox/area BEFORE things are pasted over it.
   The pixels of a quarantined instance keep their stuff segment (if any) and are otherwise void.
   Semantic/instance PNGs whose size differs from the image -> record-level `size_mismatch`; an
   image without either PNG -> record-level `missing_file`; a PNG without image -> record-level
   `orphan_annotation`.

b. The prepared panoptic layout of detectron2/X-SAM, `--images DIR --annotations
   ade20k_panoptic_val.json --masks ade20k_panoptic_val/`: COCO panoptic format, converted by the
   COCO panoptic converter's logic (`CocoPanoptic.convert`). The JSON's category ids may be 0-based
   (0..149, as Mask2Former/X-SAM write them) or 1-based (1..150); records always carry 1..150.
   `ignore` = void pixels (panoptic id 0), i.e. semantic 0 AND thing-class pixels no instance covers:
   the semantic PNG is not part of this layout, so use layout a for exact semantic ground truth.

Record contract (both layouts):
- key `make_key("ade20k", split, stem)`, e.g. "ade20k-validation-ade_val_00000001" (the stem is
  ADE's own image id, so both layouts give the same keys); `source.upstream_ids = {"image_id": stem
  or the JSON's image id}`;
- `Segment.category_id` = the 1-based SceneParsing-150 id (the semantic PNG value),
  `category_name` = the display name of `ade20k_150_names.tsv` (object150_info.csv's words with
  their spaces restored, e.g. "building, edifice", "coffee table, cocktail table"; prompts show the
  primary name, `xsam.data.render.clean_category_name`), `isthing` = the class is one of the 100
  instance classes (NOT the csv's `Stuff` column: e.g. "tree" is stuff here, as upstream);
- segment ids (layout a): stuff = its category id (1..150); thing = 1000 * category id + instance id
  (the G value, 1..255), e.g. 13004 = person, instance 4 (Mask2Former's label divisor is 1000 too);
  layout b keeps the JSON's segment ids;
- where the 100-class id lives: the dataset category table (`dataset.json` `categories[*]
  .instance_id`, 1..100 or null) and, so that a record alone suffices, `meta["instance_class_ids"]`:
  {str(segment id): instance class 1..100} for every thing segment. The instance view (X-SAM /
  Mask2Former `ade20k_instance_val.json`) = `xsam.data.views.instance_view(record)`: the thing
  segments, labelled with their 150-id as upstream does ("share category id for both instance and
  panoptic annotations"), or with the 100-class id from that map;
- `ignore` (layout a) = pixels whose semantic value is 0 ("other"), plus values above 150;
- `meta["semantic_residual"]` (layout a): [{"category_id": c, "rle": {...}}], the pixels whose
  semantic class c (1..150) differs from what the panoptic segments say (a thing overriding another
  class, or a thing-class pixel no instance covers). `semantic_label_map(record)` paints segments,
  then the residual, then `ignore`, and so reproduces Mask2Former's `annotations_detectron2` map
  (semantic PNG - 1, 0 -> 255) pixel-exactly; `xsam.data.views.semantic_map` ignores the residual and
  equals it everywhere else.

Dataset identity (`dataset.json` `inputs`, which decides resume and "already complete"): the sha256
of the two packaged tables, plus the annotation JSON (layout b) or, for the release (layout a),
whose PNGs are too many to hash on the driver, a fingerprint of the names and sizes of every file
the plan lists. Each record keeps the sha256 of its own semantic PNG (`source.annotation_sha256`)
and instance PNG (`meta["instance_annotation"]`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Converter,
    InputFile,
    Plan,
    UpstreamRecord,
    blamed_on,
    image_model,
    load_json_input,
    read_image,
    require_keys,
)
from dataprep.converters.coco_instances import category_table
from dataprep.converters.coco_panoptic import CocoPanoptic
from dataprep.imagecheck import decode_png_array
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.sources import FileTree, open_tree
from dataprep.converters.ade20k_tables import (
    NUM_CLASSES,
    NUM_INSTANCE_CLASSES,
    TABLE_FILES,
    AdeTables,
    load_tables,
)
from xsam.data import masks
from xsam.data.schema import Record, Segment, Source, make_key

THING_ID_DIVISOR = 1000  # thing segment id = THING_ID_DIVISOR * category id + instance id
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

FIX_PREPARED = "pass the detectron2/X-SAM panoptic file such as ade20k_panoptic_val.json"
ROOT_HINT = "pass the ADEChallengeData2016 folder (images/, annotations/, annotations_instance/) or its .zip/.tar"
HOW_TO = (
    "pass either the ADEChallengeData2016 release: --root ADEChallengeData2016 (folder, .zip or .tar) "
    "[--split validation|training], or the prepared panoptic layout: --images images/validation "
    "--annotations ade20k_panoptic_val.json --masks ade20k_panoptic_val"
)


# ---- the panoptic construction (pure numpy) -----------------------------------------------


@dataclass(slots=True)
class PanopticParts:
    """Mask2Former's ADE panoptic annotation of one image, plus what a record needs besides."""

    segment_map: np.ndarray  # (H, W) int32: segment id per pixel, 0 = no segment
    categories: dict[int, int]  # segment id -> 1..150
    instance_classes: dict[int, int]  # thing segment id -> instance class 1..100
    ignore: np.ndarray  # (H, W) bool
    residual: dict[int, np.ndarray]  # 1..150 -> pixels of that semantic class not labelled so
    problems: list[tuple[str, str, str]]  # (part id, reason, message)


def build_panoptic(semantic: np.ndarray, instance: np.ndarray, tables: AdeTables) -> PanopticParts:
    """Semantic (H, W) uint8 + instance (H, W, 3) uint8 -> panoptic segments, as Mask2Former does."""
    problems: list[tuple[str, str, str]] = []
    sem = semantic.astype(np.int32)
    ignore = sem == 0
    seg_map = np.zeros(sem.shape, np.int32)
    categories: dict[int, int] = {}
    # stuff first, from the semantic map
    for value in np.unique(sem).tolist():
        if value == 0:
            continue
        mask = sem == value
        if value not in tables.names:
            problems.append(
                (f"semantic:{value}", "unknown_category",
                 f"semantic PNG holds class {value} on {int(mask.sum())} pixels; SceneParsing classes are "
                 f"1..{NUM_CLASSES} (0 = other); those pixels are ignored")
            )
            ignore |= mask
            continue
        if value in tables.instance_of_semantic:
            continue  # a thing class: its segments come from the instance PNG
        seg_map[mask] = value
        categories[value] = value
    # things, pasted over stuff: one segment per instance id (G), its class from R
    cls = instance[..., 0].astype(np.int32)
    ins = instance[..., 1].astype(np.int32)
    instance_classes: dict[int, int] = {}
    fg = ins > 0
    pairs = np.unique(ins[fg] * 256 + cls[fg]).tolist()
    classes_of: dict[int, list[int]] = {}
    for pair in pairs:
        classes_of.setdefault(pair // 256, []).append(pair % 256)
    for g, rs in sorted(classes_of.items()):
        if len(rs) > 1:
            problems.append(
                (f"instance:{g}", "invalid_annotation",
                 f"instance {g} of the instance PNG carries several instance classes {rs} (R channel); "
                 "an instance has one class, so it is left out")
            )
            continue
        r = rs[0]
        if r not in tables.semantic_of_instance:
            problems.append(
                (f"instance:{g}", "unknown_category",
                 f"instance {g} has instance class {r} (R channel), not one of the {NUM_INSTANCE_CLASSES} "
                 "classes of ade20k_instance_catid_mapping.txt; it is left out")
            )
            continue
        category = tables.semantic_of_instance[r]
        seg_id = THING_ID_DIVISOR * category + g
        seg_map[ins == g] = seg_id
        categories[seg_id] = category
        instance_classes[seg_id] = r
    # stuff overridden everywhere by things leaves no pixel
    present = set(np.unique(seg_map).tolist())
    for seg_id in sorted(set(categories) - present):
        problems.append(
            (f"semantic:{seg_id}", "empty_mask",
             f"every pixel of stuff class {seg_id} ({tables.names[seg_id]}) is covered by thing instances, "
             "which override stuff; no segment is left")
        )
        del categories[seg_id]
    # semantic pixels the panoptic labels disagree with
    label = np.where(seg_map >= THING_ID_DIVISOR, seg_map // THING_ID_DIVISOR, seg_map)
    off = (label != sem) & ~ignore
    residual = {int(c): off & (sem == c) for c in np.unique(sem[off]).tolist()}
    return PanopticParts(
        segment_map=seg_map, categories=categories, instance_classes=instance_classes, ignore=ignore,
        residual=residual, problems=problems,
    )


def semantic_label_map(record: Record, ignore_value: int = 255) -> np.ndarray:
    """Mask2Former's semantic ground truth of an ADE record: (H, W) uint8, class id - 1, `ignore_value`.

    Segments, then `meta["semantic_residual"]` (layout a; absent in layout b), then `record.ignore`;
    pixels nothing labels get `ignore_value`. For layout a this is exactly the `annotations_detectron2`
    map (semantic PNG - 1, 0 -> 255).
    """
    out = np.full((record.image.height, record.image.width), ignore_value, np.uint8)
    for seg in record.segments:
        if seg.category_id is None or not 1 <= seg.category_id <= NUM_CLASSES:
            raise ValueError(f"record {record.key}: segment {seg.id} has category {seg.category_id}, not 1..150")
        out[masks.decode(seg.rle)] = seg.category_id - 1
    for entry in record.meta.get("semantic_residual", []):
        out[masks.decode(entry["rle"])] = int(entry["category_id"]) - 1
    if record.ignore is not None:
        out[masks.decode(record.ignore)] = ignore_value
    return out


# ---- the converter --------------------------------------------------------------------------


def split_from_names(*names: str | None) -> str | None:
    """ADE split name (`validation` / `training`) from file names such as ade20k_panoptic_val.json."""
    for name in names:
        if not name:
            continue
        match = re.search(r"(?<![a-z])(training|validation|train|val)(?![a-z])", Path(str(name)).name.lower())
        if match:
            return "training" if match.group(1).startswith("train") else "validation"
    return None


class _PreparedPanoptic(CocoPanoptic):
    """COCO panoptic conversion of X-SAM's ade20k_panoptic_*.json, recorded as ade20k / ovseg."""

    name = "ade20k"
    task = "ovseg"


class Ade20k(Converter):
    name = "ade20k"
    task = "ovseg"
    version = "1"
    required_inputs: dict[str, str] = {}  # either --root or --images/--annotations/--masks (checked in __init__)
    optional_inputs = {
        "root": "layout a: the ADEChallengeData2016 release, folder or .zip/.tar "
        "(images/, annotations/, annotations_instance/)",
        "split": "layout a: validation (default) or training; layout b: default from the file names "
        "(ade20k_panoptic_val.json -> validation)",
        "images": "layout b: folder or .zip/.tar of the images (e.g. images/validation)",
        "annotations": "layout b: detectron2/X-SAM panoptic JSON (e.g. ade20k_panoptic_val.json)",
        "masks": "layout b: folder or .zip of its panoptic PNGs (e.g. ade20k_panoptic_val/)",
    }
    example = "xsam data convert ade20k --out data/ade20k-val --root ADEChallengeData2016.zip --split validation"

    def __init__(self, **inputs: Any) -> None:
        super().__init__(**inputs)
        prepared = [k for k in ("images", "annotations", "masks") if self.inputs.get(k)]
        if self.inputs.get("root"):
            if prepared:
                raise InputError(
                    f"{self.name}: --root (the release) and {', '.join('--' + k for k in prepared)} (the prepared "
                    f"panoptic layout) exclude each other; {HOW_TO}"
                )
            self.layout = "release"
        elif len(prepared) == 3:
            self.layout = "prepared"
        else:
            missing = [f"--{k}" for k in ("images", "annotations", "masks") if k not in prepared]
            what = f"the prepared panoptic layout also needs {', '.join(missing)}" if prepared else "no input given"
            raise InputError(f"{self.name}: {what}; {HOW_TO}")
        self._tables = load_tables()
        self._tree: FileTree | None = None
        self._base = ""  # folder of images/ annotations/ inside the root tree
        self._panoptic: _PreparedPanoptic | None = None

    # -- shared ---------------------------------------------------------------------------

    def _split(self) -> str:
        if self.inputs.get("split"):
            return str(self.inputs["split"])
        if self.layout == "release":
            return "validation"
        found = split_from_names(self.inputs["annotations"], self.inputs["masks"], self.inputs["images"])
        return found or "default"

    def parameters(self) -> dict[str, Any]:
        return {"layout": self.layout, "split": self._split()}

    def _table_inputs(self) -> list[InputFile]:
        return [InputFile(option="package-data", name=n, sha256=self._tables.sha256[n]) for n in TABLE_FILES]

    def plan(self) -> Plan:
        return self._plan_release() if self.layout == "release" else self._plan_prepared()

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        if self.layout == "release":
            return self._convert_release(upstream, options)
        return self._convert_prepared(upstream, options)

    def _root_tree(self) -> FileTree:
        # Opened once per process: a zip's directory is read once per unit, not once per record.
        if self._tree is None:
            self._tree = open_tree(self.inputs["root"], option="--root", hint=ROOT_HINT)
        return self._tree

    def _row(
        self, level: str, record_id: str, key: str, reason: str, message: str, *, source: str, part: str = ""
    ) -> QuarantineRow:
        return QuarantineRow(
            level=level, source_file=source, record_id=record_id, part_id=part, key=key, reason=reason, message=message
        )

    # -- layout a: the ADEChallengeData2016 release ------------------------------------------

    def _plan_release(self) -> Plan:
        split = self._split()
        tree = self._root_tree()
        names = tree.names()
        base = self._find_base(names, split)
        self._base = base
        image_dir, sem_dir, ins_dir = (f"{base}{d}/{split}/" for d in ("images", "annotations", "annotations_instance"))

        def listing(prefix: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
            """(stem, full name) of the files directly in folder `prefix` with one of `suffixes`."""
            out = []
            for n in names:
                rest = n[len(prefix):]
                if n.startswith(prefix) and "/" not in rest and PurePosixPath(rest).suffix.lower() in suffixes:
                    out.append((PurePosixPath(rest).stem, n))
            return out

        images = listing(image_dir, IMAGE_SUFFIXES)
        sem_stems = dict(listing(sem_dir, (".png",)))
        ins_stems = dict(listing(ins_dir, (".png",)))
        listed = sorted([n for _, n in images] + list(sem_stems.values()) + list(ins_stems.values()))
        # The release has no annotation file to hash (thousands of PNGs); the plan identity gets a
        # fingerprint of the names and sizes of every file it lists, so that another root (or an
        # edited one) is never taken for a finished or resumable conversion of this one.
        sizes = {n: tree.size(n) or 0 for n in listed}
        fingerprint = hashlib.sha256(
            "".join(f"{n[len(base):]}\t{sizes[n]}\n" for n in listed).encode("utf-8")
        ).hexdigest()
        listing_input = InputFile(
            option="root", name=f"{split}: names and sizes of the {len(listed)} files listed", sha256=fingerprint
        )
        rows: list[QuarantineRow] = []
        records: list[UpstreamRecord] = []
        by_key: dict[str, str] = {}
        for stem, full in images:
            key = make_key(self.name, split, stem)
            if key in by_key:
                rows.append(self._row("record", stem, key, "duplicate_id",
                                      f"{full} has the same id as {by_key[key]}; the first one was kept", source=full))
                continue
            by_key[key] = full
            missing = [d + f"{stem}.png" for d, got in ((sem_dir, sem_stems), (ins_dir, ins_stems)) if stem not in got]
            if missing:
                rows.append(self._row("record", stem, key, "missing_file",
                                      f"image {full} has no {' and no '.join(missing)} in {tree.root}", source=full))
                continue
            size = sizes[full]
            records.append(
                UpstreamRecord(
                    key=key, record_id=stem, image_name=full, est_bytes=size + 16384,
                    payload={"split": split, "stem": stem, "semantic": sem_stems[stem], "instance": ins_stems[stem]},
                )
            )
        for stem in sorted((set(sem_stems) | set(ins_stems)) - {stem for stem, _ in images}):
            where = [found[stem] for found in (sem_stems, ins_stems) if stem in found]
            rows.append(self._row("record", stem, make_key(self.name, split, stem), "orphan_annotation",
                                  f"{' and '.join(where)} has no image in {image_dir}", source=where[0]))
        if not records and not rows:
            raise InputError(f"--root {tree.root}: no images under {image_dir}; {HOW_TO}")
        records.sort(key=lambda r: r.key)
        return Plan(
            records=records, quarantine=rows, inputs=[listing_input, *self._table_inputs()],
            categories=self._tables.categories(), splits=[split],
        )

    def _find_base(self, names: list[str], split: str) -> str:
        """'' when the tree holds images/<split>/ at its top, else 'X/' for a single X/images/<split>/."""
        want = f"images/{split}/"
        if any(n.startswith(want) for n in names):
            return ""
        bases = sorted({n[: n.index(want)] for n in names if f"/{want}" in n and n.count("/") == want.count("/") + 1})
        if len(bases) == 1:
            return bases[0]
        splits = sorted({n.split("/")[1] for n in names if n.startswith("images/") and n.count("/") >= 2})
        found = f" (it has images/ for the splits {', '.join(splits)})" if splits else ""
        raise InputError(f"--root {self.inputs['root']}: no folder images/{split}/{found}; {HOW_TO}")

    def _convert_release(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        tree = self._root_tree()
        payload = upstream.payload
        data, info = read_image(tree, upstream.image_name, options)
        image = image_model(data, info, PurePosixPath(upstream.image_name).name, None)
        h, w = image.height, image.width

        sem_bytes, semantic = _read_map(tree, payload["semantic"], "semantic", options)
        if semantic.ndim != 2:
            raise RecordRejected(
                "corrupt_image",
                f"semantic PNG {payload['semantic']} is RGB; ADE20K semantic maps are 8-bit grey/palette class ids",
            )
        ins_bytes, instance = _read_map(tree, payload["instance"], "instance", options)
        if instance.ndim != 3:
            raise RecordRejected(
                "corrupt_image",
                f"instance PNG {payload['instance']} is single-channel; ADE20K instance maps are RGB "
                "(R = instance class, G = instance id)",
            )
        for what, arr in (("semantic", semantic), ("instance", instance)):
            name = payload[what]
            if arr.shape[:2] != (h, w):
                raise RecordRejected(
                    "size_mismatch",
                    f"{what} PNG {name} is {arr.shape[1]}x{arr.shape[0]} but image {upstream.image_name} is "
                    f"{w}x{h}; the PNG belongs to another image or release",
                )

        pan = build_panoptic(semantic, instance, self._tables)
        parts = []
        for part_id, reason, message in pan.problems:
            source = payload["instance"] if part_id.startswith("instance:") else payload["semantic"]
            parts.append(
                self._row("part", upstream.record_id, upstream.key, reason, message, source=source, part=part_id)
            )
        segments: list[Segment] = []
        phrases: list[str] = []
        for seg_id in sorted(pan.categories):
            category = pan.categories[seg_id]
            name = self._tables.names[category]
            rle = masks.encode(pan.segment_map == seg_id)
            if name not in phrases:
                phrases.append(name)
            segments.append(
                Segment(
                    id=seg_id, rle=rle, category_id=category, category_name=name,
                    isthing=category in self._tables.instance_of_semantic, iscrowd=False,
                    bbox=masks.bbox(rle), area=float(masks.area(rle)), phrase_index=phrases.index(name),
                )
            )
        record = Record(
            key=upstream.key,
            task=self.task,
            source=Source(
                corpus=self.name, split=payload["split"], upstream_ids={"image_id": payload["stem"]},
                annotation_file=payload["semantic"][len(self._base):],
                annotation_sha256=hashlib.sha256(sem_bytes).hexdigest(),
            ),
            image=image,
            segments=segments,
            ignore=masks.encode(pan.ignore) if pan.ignore.any() else None,
            phrases=phrases,
            meta={
                "layout": "ADEChallengeData2016",
                "instance_annotation": {
                    "file": payload["instance"][len(self._base):],
                    "sha256": hashlib.sha256(ins_bytes).hexdigest(),
                },
                "instance_class_ids": {str(k): v for k, v in sorted(pan.instance_classes.items())},
                "semantic_residual": [
                    {"category_id": c, "rle": masks.encode(m).model_dump(mode="json")}
                    for c, m in sorted(pan.residual.items())
                ],
            },
        )
        return Converted(record=record, image_bytes=data, parts=parts)

    # -- layout b: detectron2/X-SAM ade20k_panoptic_*.json ---------------------------------

    def _plan_prepared(self) -> Plan:
        path = self.inputs["annotations"]
        data, input_file = load_json_input(path, "annotations", FIX_PREPARED)
        require_keys(data, ["images", "annotations", "categories"], path, "annotations", FIX_PREPARED)
        upstream_cats = category_table(data["categories"], path, "annotations", FIX_PREPARED)
        cats = self._map_categories(upstream_cats, path)
        split = self._split()
        source = input_file.name

        rows: list[QuarantineRow] = []

        def row(record_id: Any, key: str, reason: str, message: str) -> None:
            rows.append(self._row("record", str(record_id), key, reason, message, source=source))

        images: dict[Any, dict[str, Any]] = {}
        keys: dict[str, Any] = {}
        for i, img in enumerate(data["images"] if isinstance(data["images"], list) else []):
            image_id = img.get("id") if isinstance(img, dict) else None
            ok = (
                isinstance(img, dict) and isinstance(img.get("file_name"), str) and img["file_name"]
                and isinstance(image_id, (int, str)) and not isinstance(image_id, bool) and str(image_id)
            )
            if not ok:
                row(f"images[{i}]", "", "invalid_annotation",
                    f"images[{i}] lacks an id or a file_name: {str(img)[:200]}")
                continue
            key = make_key(self.name, split, PurePosixPath(img["file_name"]).stem)
            if image_id in images or key in keys:
                row(image_id, key, "duplicate_id",
                    f"images[{i}] (id {image_id!r}, file {img['file_name']}) repeats an image id or file name; "
                    "the first entry was kept")
                continue
            images[image_id] = img
            keys[key] = image_id
        ann_by_image: dict[Any, dict[str, Any]] = {}
        for i, ann in enumerate(data["annotations"] if isinstance(data["annotations"], list) else []):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            ok = isinstance(ann, dict) and isinstance(ann.get("file_name"), str)
            if not (ok and isinstance(ann.get("segments_info"), list)):
                row(image_id, "", "invalid_annotation", f"annotations[{i}] lacks file_name or a segments_info list")
                continue
            if image_id not in images:
                row(image_id, "", "orphan_annotation",
                    f"annotations[{i}] ({ann['file_name']}) points at image id {image_id!r}, which `images` lacks")
                continue
            if image_id in ann_by_image:
                first_key = make_key(self.name, split, PurePosixPath(images[image_id]["file_name"]).stem)
                row(image_id, first_key, "duplicate_id",
                    f"annotations[{i}] is a second panoptic annotation of image {image_id!r}; the first was kept")
                continue
            ann_by_image[image_id] = ann

        image_tree = open_tree(self.inputs["images"], option="--images", hint=HOW_TO)
        open_tree(self.inputs["masks"], option="--masks", hint=HOW_TO)  # fail fast when missing
        records = []
        for image_id, img in images.items():
            key = make_key(self.name, split, PurePosixPath(img["file_name"]).stem)
            ann = ann_by_image.get(image_id)
            if ann is None:
                row(image_id, key, "missing_annotation", f"image {img['file_name']} has no entry in `annotations`")
                continue
            try:
                size = image_tree.size(img["file_name"]) or 0
            except RecordRejected:
                size = 0
            records.append(
                UpstreamRecord(
                    key=key, record_id=str(image_id), image_name=img["file_name"], est_bytes=size + 16384,
                    payload={"image": img, "annotation": ann, "split": split},
                )
            )
        records.sort(key=lambda r: r.key)
        helper = _PreparedPanoptic(**{k: self.inputs[k] for k in ("images", "annotations", "masks")}, split=split)
        helper._categories = cats
        helper._source = input_file
        self._panoptic = helper
        return Plan(
            records=records, quarantine=rows, inputs=[input_file, *self._table_inputs()],
            categories=self._tables.categories(), splits=[split],
        )

    def _map_categories(self, upstream: dict[int, dict[str, Any]], path: str) -> dict[int, dict[str, Any]]:
        """JSON category id -> {"id": 1..150, "name": display name, "isthing": mapping}."""
        ids = set(upstream)
        offset = 1 if 0 in ids else 0
        if not ids or min(ids) < 0 or max(ids) + offset > NUM_CLASSES:
            raise InputError(
                f"--annotations: {path}: category ids {min(ids, default=None)}..{max(ids, default=None)} are neither "
                f"0..{NUM_CLASSES - 1} (Mask2Former/X-SAM) nor 1..{NUM_CLASSES}; {FIX_PREPARED}"
            )
        # Guard against a table in another order: most names must be synonyms of the mapped class.
        agree = sum(
            _primary(c["name"]) in {s.strip() for s in self._tables.names[cid + offset].lower().replace(", ", ";").split(";")}
            for cid, c in upstream.items()
        )
        if agree * 2 < len(upstream):
            raise InputError(
                f"--annotations: {path}: only {agree} of {len(upstream)} category names match the SceneParsing-150 "
                f"names of their ids (read as {'0' if offset else '1'}-based); the file is not ADE20K-150; "
                f"{FIX_PREPARED}"
            )
        return {
            cid: {
                "id": cid + offset,
                "name": self._tables.names[cid + offset],
                "isthing": (cid + offset) in self._tables.instance_of_semantic,
            }
            for cid in sorted(upstream)
        }

    def _convert_prepared(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        if self._panoptic is None:
            raise RuntimeError("ade20k: convert() called before plan()")
        converted = self._panoptic.convert(upstream, options)
        record = converted.record
        record.meta["layout"] = "ade20k_panoptic"
        record.meta["instance_class_ids"] = {
            str(s.id): self._tables.instance_of_semantic[s.category_id]
            for s in sorted(record.segments, key=lambda s: s.id)
            if s.category_id in self._tables.instance_of_semantic
        }
        return converted


def _primary(name: str) -> str:
    """'building, edifice' / 'window ' -> 'building' / 'window'."""
    return re.split(r"[;,]", name, maxsplit=1)[0].strip().lower()


def _read_map(tree: Any, name: str, kind: str, options: ConvertOptions) -> tuple[bytes, Any]:
    """A semantic / instance PNG's bytes and pixels; a bad one is quarantined naming that file, not the
    record's image."""
    with blamed_on(name, f"{kind} PNG"):
        data = tree.read(name)
        return data, decode_png_array(data, max_pixels=options.max_pixels)
