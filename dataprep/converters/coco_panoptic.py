"""COCO panoptic (`panoptic_*.json` + PNG id maps) -> genseg records.

Upstream format: https://cocodataset.org/#format-data ("Panoptic Segmentation") and panopticapi:
each PNG pixel holds a segment id = R + 256 * G + 256^2 * B (0 = void), listed in the image's
`segments_info` with its category, `iscrowd`, `bbox` and `area`. One record per image holds every
segment with `isthing`, so the semantic view (per category, things and stuff) and the instance view
(things only) are derived from the same record (`xsam.data.views`), as X-SAM does, instead of being
stored three times. `ignore` = void pixels, crowd segments and ids missing from `segments_info`.
"""

from __future__ import annotations

from typing import Any


from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Plan,
    UpstreamRecord,
    blamed_on,
    cached_tree,
    estimate_bytes,
)
from dataprep.converters.coco_instances import CocoJsonConverter, id_map_from_rgb
from dataprep.imagecheck import decode_png_array
from dataprep.quarantine import QuarantineRow, RecordRejected
from dataprep.sources import open_tree
from xsam.data import masks
from xsam.data.schema import Record, Segment, checked_model, make_key

FIX_PANOPTIC = "pass a COCO panoptic file such as annotations/panoptic_val2017.json"


class CocoPanoptic(CocoJsonConverter):
    name = "coco-panoptic"
    task = "genseg"
    version = "1"
    required_inputs = {
        "images": "folder or .zip/.tar of the COCO images (e.g. val2017/)",
        "annotations": "COCO panoptic JSON (e.g. annotations/panoptic_val2017.json)",
        "masks": "folder or .zip of the panoptic PNGs (e.g. annotations/panoptic_val2017.zip)",
    }
    optional_inputs = {"split": "split name for the record keys (default: from the file names, e.g. val2017)"}
    example = (
        "xsam data convert coco-panoptic --out data/coco-panoptic --images val2017 "
        "--annotations annotations/panoptic_val2017.json --masks annotations/panoptic_val2017.zip"
    )
    split_inputs = ("annotations", "masks", "images")
    fix = FIX_PANOPTIC

    def plan(self) -> Plan:
        data, _, images, rows = self._load()
        split = self._split()
        source_file = self._source.name

        ann_by_image: dict[int, dict[str, Any]] = {}
        for i, ann in enumerate(data["annotations"]):
            ok = (
                isinstance(ann, dict)
                and isinstance(ann.get("file_name"), str)
                and isinstance(ann.get("segments_info"), list)
            )
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if not ok:
                rows.append(
                    QuarantineRow(
                        level="record", source_file=source_file, record_id=str(image_id), part_id="", key="",
                        reason="invalid_annotation",
                        message=f"annotations[{i}] lacks file_name or a segments_info list",
                    )
                )
                continue
            if image_id not in images:
                rows.append(
                    QuarantineRow(
                        level="record", source_file=source_file, record_id=str(image_id), part_id="", key="",
                        reason="orphan_annotation",
                        message=f"annotations[{i}] ({ann['file_name']}) points at image id {image_id}, which `images` lacks",
                    )
                )
                continue
            if image_id in ann_by_image:
                rows.append(
                    QuarantineRow(
                        level="record", source_file=source_file, record_id=str(image_id), part_id="",
                        key=make_key(self.name, split, image_id), reason="duplicate_id",
                        message=f"annotations[{i}] is a second panoptic annotation of image {image_id}; the first was kept",
                    )
                )
                continue
            ann_by_image[image_id] = ann

        tree = open_tree(self.inputs["images"], option="--images")
        open_tree(self.inputs["masks"], option="--masks")  # fail fast when the mask input is missing
        records = []
        for image_id, img in images.items():
            key = make_key(self.name, split, image_id)
            ann = ann_by_image.get(image_id)
            if ann is None:
                rows.append(
                    QuarantineRow(
                        level="record", source_file=source_file, record_id=str(image_id), part_id="", key=key,
                        reason="missing_annotation",
                        message=f"image {img['file_name']} has no entry in `annotations`",
                    )
                )
                continue
            records.append(
                UpstreamRecord(
                    key=key,
                    record_id=str(image_id),
                    image_name=img["file_name"],
                    est_bytes=estimate_bytes(tree, img["file_name"]),
                    payload={"image": img, "annotation": ann, "split": split},
                )
            )
        return self._plan(records, rows)

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        img = upstream.payload["image"]
        ann = upstream.payload["annotation"]
        data, image = self._read_record_image(upstream, options)
        h, w = image.height, image.width

        with blamed_on(ann["file_name"], "panoptic PNG"):  # the mask is what is wrong, not the (good) image
            png = cached_tree(self.inputs["masks"], "--masks").read(ann["file_name"])
            ids = id_map_from_rgb(decode_png_array(png, max_pixels=options.max_pixels))
        if ids.shape != (h, w):
            raise RecordRejected(
                "size_mismatch",
                f"panoptic PNG {ann['file_name']} is {ids.shape[1]}x{ids.shape[0]} but image "
                f"{img['file_name']} is {w}x{h}; the PNG belongs to another image or release",
            )
        parts: list[QuarantineRow] = []

        def part(seg_id: Any, reason: str, message: str) -> None:
            parts.append(self._part(upstream, seg_id, reason, message))

        runs = masks.LabelRuns(ids)
        present = runs.labels()
        listed: set[int] = set()
        ignore_ids = [0]  # void
        kept: list[tuple[int, dict[str, Any], dict[str, Any]]] = []  # (segment id, entry, category)
        for info_entry in sorted(ann["segments_info"], key=lambda s: (str(type(s.get("id"))), s.get("id"))):
            seg_id = info_entry.get("id") if isinstance(info_entry, dict) else None
            if not isinstance(seg_id, int):
                part(seg_id, "invalid_annotation", f"segments_info entry without an integer id: {str(info_entry)[:120]}")
                continue
            if seg_id in listed:
                part(seg_id, "duplicate_id", f"segment id {seg_id} listed twice in segments_info")
                continue
            listed.add(seg_id)
            cat = self._categories.get(info_entry.get("category_id"))  # type: ignore[arg-type]
            if cat is None:
                part(seg_id, "unknown_category", f"category_id {info_entry.get('category_id')!r} is not in `categories`")
                ignore_ids.append(seg_id)
                continue
            if seg_id not in present:
                part(seg_id, "empty_mask", f"segment id {seg_id} does not occur in {ann['file_name']}")
                continue
            if info_entry.get("iscrowd", 0):
                ignore_ids.append(seg_id)
            kept.append((seg_id, info_entry, cat))
        for seg_id in sorted(present - listed - {0}):
            part(seg_id, "unlisted_segment", f"{ann['file_name']} holds segment id {seg_id}, which segments_info lacks; its pixels are ignored")
            ignore_ids.append(seg_id)

        # every mask from one run-length pass over the id map (byte-equal to encoding each mask)
        rles = runs.encode({**{seg_id: [seg_id] for seg_id, _, _ in kept}, "ignore": ignore_ids})
        segments: list[Segment] = []
        names: list[str] = []
        for seg_id, info_entry, cat in kept:
            rle = rles[seg_id]
            bbox = info_entry.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                bbox = list(masks.bbox(rle))
            area = info_entry.get("area")
            if not isinstance(area, (int, float)):
                area = masks.area(rle)
            if cat["name"] not in names:
                names.append(cat["name"])
            values = {
                "id": seg_id, "rle": rle, "category_id": cat["id"], "category_name": cat["name"],
                "isthing": cat["isthing"], "iscrowd": bool(info_entry.get("iscrowd", 0)),
                "bbox": tuple(float(v) for v in bbox), "area": float(area), "phrase_index": names.index(cat["name"]),
            }
            checked = (
                type(seg_id) is int
                and type(values["category_id"]) is int
                and type(values["category_name"]) is str
                and type(values["isthing"]) is bool
                and len(values["bbox"]) == 4
                and values["area"] >= 0  # Segment.area: ge=0 (False for NaN)
            )
            # rle is an RLE, iscrowd a bool, bbox floats, phrase_index an int >= 0: exactly what
            # validating would store (xsam.data.schema.checked_model), else Segment validates (and may reject)
            segments.append(checked_model(Segment, values) if checked else Segment(**values))
        ignore = rles["ignore"]

        record = Record(
            key=upstream.key,
            task=self.task,
            source=self._record_source(upstream),
            image=image,
            segments=segments,
            ignore=ignore if masks.area(ignore) else None,
            phrases=names,
            meta={"panoptic_file_name": ann["file_name"]},
        )
        return Converted(record=record, image_bytes=data, parts=parts)
