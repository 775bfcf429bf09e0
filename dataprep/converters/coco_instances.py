"""COCO instances (`instances_*.json`: polygons, RLE, iscrowd) -> genseg records.

Upstream format: https://cocodataset.org/#format-data ("Object Detection"). One record per entry of
`images`, holding every annotation of that image as a segment: polygons are rasterised exactly as
pycocotools' `annToMask` does (`frPyObjects` + `merge`), RLE (compressed or the uncompressed crowd
form) is kept losslessly. Crowd annotations stay segments with `iscrowd=True` and are also OR-ed
into the record's `ignore` mask (COCO evaluation ignores them).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pycocotools import mask as mask_utils

from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Converter,
    Plan,
    UpstreamRecord,
    cached_tree,
    estimate_bytes,
    image_model,
    load_json_input,
    read_image,
    require_keys,
)
from dataprep.quarantine import QuarantineRow, RecordRejected
from dataprep.sources import open_tree
from xsam.data import masks
from xsam.data.schema import RLE, Image, Record, Segment, Source, checked_model, make_key

_NUMBER = (int, float)
FIX_INSTANCES = "pass a COCO instances file such as annotations/instances_val2017.json"


def split_from_names(*names: str | None) -> str | None:
    """COCO-style split name (`train2017`, `val2014`...) found in any of the given file names."""
    for name in names:
        if name:
            match = re.search(r"(train|val|test|minival)(\d{4})", Path(str(name)).name)
            if match:
                return match.group(0)
    return None


def category_table(categories: Any, path: str, option: str, fix: str) -> dict[int, dict[str, Any]]:
    from dataprep.quarantine import InputError

    table: dict[int, dict[str, Any]] = {}
    if not isinstance(categories, list):
        raise InputError(f"--{option}: {path}: `categories` must be a list; {fix}")
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise InputError(f"--{option}: {path}: malformed category entry {cat!r}; {fix}")
        if cat["id"] in table:
            raise InputError(f"--{option}: {path}: category id {cat['id']} listed twice; {fix}")
        table[cat["id"]] = {"id": cat["id"], "name": cat["name"], "isthing": bool(cat.get("isthing", 1))}
    return table


def image_entries(
    images: Any, *, corpus: str, split: str, source_file: str
) -> tuple[dict[int, dict[str, Any]], list[QuarantineRow]]:
    """`images` list -> {id: entry}, quarantining malformed entries and duplicate ids (record level)."""
    by_id: dict[int, dict[str, Any]] = {}
    rows: list[QuarantineRow] = []
    for i, img in enumerate(images):
        ok = isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
        if not ok:
            rows.append(
                QuarantineRow(
                    level="record", source_file=source_file, record_id=f"images[{i}]", part_id="", key="",
                    reason="invalid_annotation", message=f"images[{i}] lacks an integer id or a file_name: {str(img)[:200]}",
                )
            )
            continue
        if img["id"] in by_id:
            rows.append(
                QuarantineRow(
                    level="record", source_file=source_file, record_id=str(img["id"]), part_id="",
                    key=make_key(corpus, split, img["id"]), reason="duplicate_id",
                    message=f"image id {img['id']} listed again (images[{i}], file {img['file_name']}); the first entry was kept",
                )
            )
            continue
        by_id[img["id"]] = img
    return by_id, rows


def polygon_or_rle(seg: Any, height: int, width: int) -> tuple[RLE | None, str | None, str]:
    """Upstream `segmentation` -> (RLE, None, "") or (None, reason, message) for quarantine."""
    rle, reason, message = _segmentation_rle(seg, height, width)
    if rle is None or masks.area(rle) == 0:
        return None, reason, message
    return rle, None, ""


_EMPTY_RLE = ("empty_mask", "RLE mask covers no pixel")


def _segmentation_rle(seg: Any, height: int, width: int) -> tuple[RLE | None, str, str]:
    """`polygon_or_rle` before its no-pixel check: (RLE, reason, message if it covers no pixel) or
    (None, reason, message)."""
    if isinstance(seg, list):
        if seg and all(isinstance(piece, dict) for piece in seg):
            # one object given as several RLE pieces (gRefCOCO's instances.json: its reference loader
            # and LISA sum the decoded pieces into one binary mask): their union
            pieces = []
            for i, piece in enumerate(seg):
                rle, reason, message = _segmentation_rle(piece, height, width)
                if rle is None:
                    return None, reason, f"RLE piece {i} of {len(seg)}: {message}"
                pieces.append(rle)
            return masks.union(pieces, height, width), *_EMPTY_RLE
        if not seg or not all(isinstance(poly, list) for poly in seg):
            return None, "degenerate_polygon", "segmentation is an empty or malformed polygon list"
        for poly in seg:
            if len(poly) < 6 or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
                return None, "degenerate_polygon", f"polygon with {len(poly)} coordinates (need >= 3 x,y points)"
        rles = mask_utils.frPyObjects(seg, height, width)
        merged = mask_utils.merge(rles)
        rle = masks.make_rle(height, width, merged["counts"].decode("ascii"))
        return rle, "degenerate_polygon", "polygon covers no pixel"
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [height, width]:
            return None, "size_mismatch", f"RLE size {seg['size']} != image [h, w] [{height}, {width}]"
        try:
            rle = masks.from_coco(seg)
        except (TypeError, ValueError) as err:
            return None, "invalid_annotation", f"unreadable RLE: {err}"
        problem = masks.counts_problems([rle.counts], height * width)[0]
        if problem is not None:  # pycocotools would decode it from uninitialised memory
            return None, "invalid_annotation", f"unreadable RLE: {problem}"
        return rle, *_EMPTY_RLE
    return None, "invalid_annotation", f"segmentation is neither polygons nor RLE: {str(seg)[:120]}"


def _precomputed_masks(
    anns: list[dict[str, Any] | None], height: int, width: int, check_runs: bool = False
) -> list[tuple[RLE, int, str, str] | None]:
    """Per annotation (None: skip it), what `polygon_or_rle` would compute from its segmentation:
    (RLE, pixel count, reason, message if the count is 0), with ONE pycocotools area call for all.

    An upstream compressed RLE is taken as it is, its size checked; with `check_runs` (`--verify
    full`) its runs are also checked to cover the mask exactly (pycocotools does not check that, and
    a short one decodes from uninitialised memory; lint and every decode check it in any case).
    Checking costs ~1-2 ms per COCO image here, more than the rest of a record's conversion.

    None where `polygon_or_rle` would not return an RLE or would raise (anything unusual, caught
    here): the caller runs `polygon_or_rle` itself there, so rejections, their messages and any
    exception come exactly as before, in annotation order. Pure: the segmentations are not changed.
    """
    found: list[tuple[RLE, str, str] | None] = []
    coco: list[dict[str, Any]] = []
    broken: set[str] = set()
    if check_runs:  # --verify full: the runs of every upstream compressed RLE, in one pass
        candidates = [
            seg["counts"] for seg in (a.get("segmentation") if a is not None else None for a in anns)
            if type(seg) is dict and type(seg.get("counts")) is str
        ]
        broken = {c for c, why in zip(candidates, masks.counts_problems(candidates, height * width)) if why}
    for ann in anns:
        if ann is None:
            found.append(None)
            continue
        seg = ann.get("segmentation")
        if type(seg) is dict:  # the common compressed RLE: what from_coco and to_coco would give
            size, counts = seg.get("size"), seg.get("counts")
            if (
                type(size) is list
                and len(size) == 2
                and type(size[0]) is int
                and type(size[1]) is int
                and size[0] == height
                and size[1] == width
                and type(counts) is str
                and counts.isascii()
                and counts not in broken  # else polygon_or_rle says what is wrong
            ):
                h, w = size
                found.append((checked_model(RLE, {"size": (h, w), "counts": counts}), *_EMPTY_RLE))
                coco.append({"size": [h, w], "counts": counts.encode("ascii")})
                continue
        try:
            rle, reason, message = _segmentation_rle(seg, height, width)
            if rle is None:
                found.append(None)
                continue
            coco_rle = masks.to_coco(rle)
        except Exception:  # noqa: BLE001 - polygon_or_rle raises it again, in order
            found.append(None)
            continue
        found.append((rle, reason, message))
        coco.append(coco_rle)
    areas = iter(masks.areas(coco))
    return [None if f is None else (f[0], next(areas), f[1], f[2]) for f in found]


class CocoJsonConverter(Converter):
    """What the COCO-JSON converters share: the split name, the annotation file and its tables,
    part-level quarantine rows and the record's `Source`."""

    split_inputs: ClassVar[tuple[str, ...]] = ("annotations", "images")
    fix: ClassVar[str] = ""

    def _split(self) -> str:
        split = self.inputs.get("split") or split_from_names(*(self.inputs.get(k) for k in self.split_inputs))
        return split or "default"

    def parameters(self) -> dict[str, Any]:
        return {"split": self._split()}

    def _load(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, dict[str, Any]], list[QuarantineRow]]:
        """Parse the annotation JSON: (document, category table, images by id, quarantine rows)."""
        path = self.inputs["annotations"]
        data, self._source = load_json_input(path, "annotations", self.fix)
        require_keys(data, ["images", "annotations", "categories"], path, "annotations", self.fix)
        self._categories = category_table(data["categories"], path, "annotations", self.fix)
        images, rows = image_entries(data["images"], corpus=self.name, split=self._split(), source_file=self._source.name)
        return data, self._categories, images, rows

    def _plan(self, records: list[UpstreamRecord], rows: list[QuarantineRow]) -> Plan:
        records.sort(key=lambda r: r.key)
        cats = self._categories
        return Plan(
            records=records, quarantine=rows, inputs=[self._source],
            categories=[cats[c] for c in sorted(cats)], splits=[self._split()],
        )

    def _part(self, upstream: UpstreamRecord, part_id: Any, reason: str, message: str) -> QuarantineRow:
        return QuarantineRow(
            level="part", source_file=self._source.name, record_id=upstream.record_id, part_id=str(part_id),
            key=upstream.key, reason=reason, message=message,
        )

    def _read_record_image(self, upstream: UpstreamRecord, options: ConvertOptions) -> tuple[bytes, Image]:
        """The record's image bytes and `Image`, checked against the size the annotations declare."""
        img = upstream.payload["image"]
        data, info = read_image(cached_tree(self.inputs["images"], "--images"), img["file_name"], options)
        expect = (img.get("height"), img.get("width"))
        return data, image_model(data, info, img["file_name"], expect if None not in expect else None)

    def _reaches_mask(self, ann: dict[str, Any]) -> bool:
        """Whether `_annotation_segments` gets as far as the annotation's mask (False if unsure)."""
        try:
            ann_id, category_id = ann.get("id"), ann.get("category_id")
            if not isinstance(ann_id, int):
                return False
            if self._categories.get(category_id) is None:  # type: ignore[arg-type]
                return not self._categories and isinstance(category_id, int)
            return True
        except Exception:  # noqa: BLE001 - e.g. an unhashable category id: the loop raises it, in order
            return False

    def _annotation_segments(
        self, upstream: UpstreamRecord, h: int, w: int, parts: list[QuarantineRow], options: ConvertOptions
    ) -> tuple[list[Segment], list[RLE], list[str]]:
        """The record's annotations -> (segments sorted by id, crowd masks, category names in order of
        first appearance), dropping bad annotations as part-level quarantine rows. Without a category
        table (COCO-Interactive without --instances) integer category ids are kept unnamed."""
        segments: list[Segment] = []
        crowd: list[RLE] = []
        names: list[str] = []
        anns = [a for a in upstream.payload["annotations"] or [] if isinstance(a, dict)]
        anns.sort(key=lambda a: (str(type(a.get("id"))), a.get("id")))
        precomputed = _precomputed_masks(
            [a if self._reaches_mask(a) else None for a in anns], h, w, check_runs=options.verify == "full"
        )
        for ann, pre in zip(anns, precomputed):
            ann_id = ann.get("id")
            if not isinstance(ann_id, int):
                parts.append(
                    self._part(
                        upstream,
                        ann_id,
                        "invalid_annotation",
                        f"annotation id {ann_id!r} is not an integer",
                    )
                )
                continue
            category_id = ann.get("category_id")
            cat = self._categories.get(category_id)  # type: ignore[arg-type]
            if cat is None and (
                self._categories or not isinstance(category_id, int)
            ):
                parts.append(
                    self._part(
                        upstream,
                        ann_id,
                        "unknown_category",
                        f"category_id {category_id!r} is not in `categories`",
                    )
                )
                continue
            if pre is None:
                rle, reason, message = polygon_or_rle(ann.get("segmentation"), h, w)
                pixels = None
            else:  # what polygon_or_rle returns, from the record's one area call
                rle, pixels, reason, message = pre
                if pixels == 0:
                    rle = None
            if rle is None:
                parts.append(
                    self._part(
                        upstream, ann_id, reason or "invalid_annotation", message
                    )
                )
                continue
            bbox = ann.get("bbox")
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and isinstance(bbox[0], _NUMBER)
                and isinstance(bbox[1], _NUMBER)
                and isinstance(bbox[2], _NUMBER)
                and isinstance(bbox[3], _NUMBER)
            ):
                bbox = list(masks.bbox(rle))
            area = ann.get("area")
            if not isinstance(area, (int, float)) or area < 0:
                area = masks.area(rle) if pixels is None else pixels
            iscrowd = bool(ann.get("iscrowd", 0))
            name = cat["name"] if cat else None
            phrase_index = None
            if name is not None:
                if name not in names:
                    names.append(name)
                phrase_index = names.index(name)
            isthing = cat["isthing"] if cat else True
            values = {
                "id": ann_id,
                "rle": rle,
                "category_id": category_id,
                "category_name": name,
                "isthing": isthing,
                "iscrowd": iscrowd,
                "bbox": tuple(map(float, bbox)),
                "area": float(area),
                "phrase_index": phrase_index,
            }
            checked = (
                type(ann_id) is int
                and (category_id is None or type(category_id) is int)
                and (name is None or type(name) is str)
                and type(isthing) is bool
                and values["area"] >= 0  # Segment.area: ge=0 (False for NaN)
            )
            # Every other value is built above with the exact type Segment stores (bool, a tuple of
            # 4 floats, an RLE, an int >= 0 or None): what validating would store, without the pass.
            segments.append(checked_model(Segment, values) if checked else Segment(**values))
            if iscrowd:
                crowd.append(rle)
        return segments, crowd, names

    def _record_source(self, upstream: UpstreamRecord) -> Source:
        return Source(
            corpus=self.name, split=upstream.payload["split"],
            upstream_ids={"image_id": upstream.payload["image"]["id"]},
            annotation_file=self._source.name, annotation_sha256=self._source.sha256,
        )


class CocoInstances(CocoJsonConverter):
    name = "coco-instances"
    task = "genseg"
    version = "1"
    required_inputs = {
        "images": "folder or .zip/.tar of the COCO images (e.g. val2017/ or val2017.zip)",
        "annotations": "COCO instances JSON (e.g. annotations/instances_val2017.json)",
    }
    optional_inputs = {"split": "split name for the record keys (default: from the file names, e.g. val2017)"}
    example = "xsam data convert coco-instances --out data/coco-instances --images val2017 --annotations annotations/instances_val2017.json"
    fix = FIX_INSTANCES

    def plan(self) -> Plan:
        data, _, images, rows = self._load()
        split = self._split()
        source_file = self._source.name

        anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        seen_ann: set[Any] = set()
        for i, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            if image_id not in images:
                rows.append(
                    QuarantineRow(
                        level="part", source_file=source_file, record_id=str(image_id), part_id=str(ann_id), key="",
                        reason="orphan_annotation" if isinstance(ann, dict) else "invalid_annotation",
                        message=f"annotations[{i}] (id {ann_id}) points at image id {image_id}, which `images` lacks",
                    )
                )
                continue
            if ann_id in seen_ann:
                rows.append(
                    QuarantineRow(
                        level="part", source_file=source_file, record_id=str(image_id), part_id=str(ann_id),
                        key=make_key(self.name, split, image_id), reason="duplicate_id",
                        message=f"annotation id {ann_id} listed again (annotations[{i}]); the first one was kept",
                    )
                )
                continue
            seen_ann.add(ann_id)
            anns_by_image[image_id].append(ann)

        tree = open_tree(self.inputs["images"], option="--images")
        records = []
        for image_id, img in images.items():
            records.append(
                UpstreamRecord(
                    key=make_key(self.name, split, image_id),
                    record_id=str(image_id),
                    image_name=img["file_name"],
                    est_bytes=estimate_bytes(tree, img["file_name"]),
                    payload={"image": img, "annotations": anns_by_image.get(image_id, []), "split": split},
                )
            )
        return self._plan(records, rows)

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        data, image = self._read_record_image(upstream, options)
        h, w = image.height, image.width
        parts: list[QuarantineRow] = []
        segments, crowd, names = self._annotation_segments(upstream, h, w, parts, options)
        record = Record(
            key=upstream.key,
            task=self.task,
            source=self._record_source(upstream),
            image=image,
            segments=segments,
            ignore=masks.union(crowd, h, w) if crowd else None,
            phrases=names,
        )
        return Converted(record=record, image_bytes=data, parts=parts)


def id_map_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG -> segment id map: id = R + 256 * G + 256^2 * B (uint32)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise RecordRejected("corrupt_image", f"panoptic PNG must be RGB, got array shape {rgb.shape}")
    channels = rgb.astype(np.uint32)
    return channels[..., 0] | (channels[..., 1] << 8) | (channels[..., 2] << 16)
