"""GLaMM's grounded conversation generation (GCG) data -> gcgseg records (spec §1.4 gcgseg, §5).

Upstream formats, as read by X-SAM `xsam/xsam/dataset/gcgseg_dataset.py` (GCGSegDataset, older name
of `img_gcgseg_dataset.py`) and GLaMM `dataset/gcg_datasets/GranDf_gcg_ds.py`, `eval/gcg/evaluate.py`
(mbzuai-oryx/groundingLMM); all training files live in `GranDf/annotations/train/`:

- `grandf` (`GranDf_HA_GCG_train.json`) and `psg` (`OpenPsgGCG_train.json`): a JSON list of
  `{"image_id", "file_name", "caption", "groundings": {phrase: {"token_positives": [s, e],
  "rle_masks": [RLE, ...]}}}` (optional `height`/`width`).
- `refcocog` (`RefCOCOg_GCG_train.json`): a JSON list of one-key dicts `{id: {"img_file_name",
  "caption", "refs": [{"sentence", "segmentation": [polygon, ...]}]}}` (X-SAM reads
  `next(iter(entry.values()))`); the span is `caption.find(sentence)` on the normalised caption.
- `flickr` (`flickr_mergedGT_GCG_train.json`): COCO style, `images[{id, file_name, height, width,
  caption}]`, `annotations[{id, image_id, tokens_positive: [[s, e], ...], sam_mask: RLE}]`; X-SAM
  uses `tokens_positive[0]` only and drops images whose caption has < 3 space-separated words or no
  annotation.
- `eval` (`val_test/{val,test}_gcg_coco_mask_gt.json` + `{val,test}_gcg_coco_caption_gt.json`):
  the mask GT is COCO instances (`images[{id: file stem (str), ...}]`, `annotations[{id, image_id,
  category_id: 1, segmentation: RLE}]`), the caption GT is COCO captions (`annotations[{image_id,
  caption, labels}]`); images are `GranDf_HA_images/val_test/{id}.jpg` (X-SAM: `id + ".jpg"`).

X-SAM's rules, reproduced here (what is dropped is quarantined, never silently lost):
- caption = `caption.strip('"').strip().lower()`; phrases compare lowercased (`phrase in caption`,
  else the phrase is dropped: part `upstream_filter`);
- overlapping spans (`_remove_overlapping_intervals`): spans sorted by start (stable), a span is kept
  only when its start is *strictly greater* than the end of the last kept one, so the earliest span
  wins and touching spans ([0, 5] then [5, 9]) count as overlapping, as X-SAM's map function
  asserts `end_i < start_{i+1}`; dropped spans are part rows `upstream_filter`;
- a phrase with several masks (`rle_masks`, several polygons) is ONE segment, their union
  (X-SAM `decode_mask` takes the pixel-wise maximum);
- an image left with no grounded phrase is dropped by X-SAM (`woann_cnt`): record `missing_annotation`.

Record: `captions = [normalised caption]` (`meta["caption_upstream"]` keeps the raw text), one
segment per kept phrase (id = its rank in the upstream list, or the Flickr annotation id),
`phrases` = the caption substrings `caption[s:e]` in caption order, `meta["phrase_char_spans"]`,
`meta["phrase_segments"] = [[i]]`. Eval records hold the GT caption as given, every mask-GT
annotation as a segment (file order, which GLaMM's recall aligns with the caption GT `labels`),
`meta["gt_labels"]`, and as phrases those labels that are found in the caption (case-insensitive,
left to right, non-overlapping), mapped to segment i when labels and masks have equal counts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
    require_keys,
)
from dataprep.converters.coco_instances import polygon_or_rle
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.sources import open_tree
from xsam.data import masks
from xsam.data.schema import RLE, Record, Segment, Source, make_key

FLAVORS = ("grandf", "psg", "refcocog", "flickr", "eval")
FIX = {
    "grandf": "pass GranDf/annotations/train/GranDf_HA_GCG_train.json",
    "psg": "pass GranDf/annotations/train/OpenPsgGCG_train.json",
    "refcocog": "pass GranDf/annotations/train/RefCOCOg_GCG_train.json",
    "flickr": "pass GranDf/annotations/train/flickr_mergedGT_GCG_train.json",
    "eval": "pass GranDf/annotations/val_test/{val,test}_gcg_coco_mask_gt.json",
}


def normalise(text: str) -> str:
    """X-SAM's caption/phrase normalisation: strip quotes and blanks, lowercase."""
    return text.strip('"').strip().lower()


def keep_non_overlapping(spans: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """X-SAM `_remove_overlapping_intervals` on (start, end, index): (kept, dropped) indices.

    Sorted by start (stable); kept when start > end of the last kept span."""
    kept: list[int] = []
    dropped: list[int] = []
    last_end = None
    for start, end, i in sorted(spans, key=lambda t: t[0]):
        if last_end is None or start > last_end:
            kept.append(i)
            last_end = end
        else:
            dropped.append(i)
    return kept, dropped


def _split_of(path: str) -> str:
    name = Path(path).name
    match = re.search(r"(?:^|_)(train|val|test)(?:_|\.)", name)
    return match.group(1) if match else "train"


class Gcg(Converter):
    name = "gcg"
    task = "gcgseg"
    version = "1"
    required_inputs = {
        "flavor": "grandf | psg | refcocog | flickr | eval",
        "annotations": "the flavor's JSON (e.g. GranDf_HA_GCG_train.json, val_gcg_coco_mask_gt.json)",
        "images": "folder or .zip/.tar of the images (e.g. GranDf_HA_images/train, coco/train2014)",
    }
    optional_inputs = {
        "split": "split name for the keys (default: from the file name: train, val or test)",
        "src": "eval only: the caption GT JSON (default: {split}_gcg_coco_caption_gt.json next to --annotations)",
    }
    example = (
        "xsam data convert gcg --out data/gcg-grandf --flavor grandf "
        "--annotations GranDf/annotations/train/GranDf_HA_GCG_train.json --images GranDf_HA_images/train"
    )

    def __init__(self, **inputs: Any) -> None:
        super().__init__(**inputs)
        if self.inputs["flavor"] not in FLAVORS:
            raise InputError(f"gcg: --flavor must be one of {', '.join(FLAVORS)}, got {self.inputs['flavor']!r}")
        if self.inputs.get("src") and self.inputs["flavor"] != "eval":
            raise InputError("gcg: --src (the caption GT) is only taken with --flavor eval")
        self.flavor = self.inputs["flavor"]
        self.fix = FIX[self.flavor]

    def _split(self) -> str:
        return self.inputs.get("split") or _split_of(self.inputs["annotations"])

    def parameters(self) -> dict[str, Any]:
        return {"flavor": self.flavor, "split": self._split()}

    def _key(self, image_id: Any) -> str:
        return make_key("gcg-" + self.flavor, self._split(), image_id)

    def _row(self, level: str, record_id: Any, part_id: Any, key: str, reason: str, message: str) -> QuarantineRow:
        return QuarantineRow(
            level=level, source_file=self._source.name, record_id=str(record_id), part_id=str(part_id),
            key=key, reason=reason, message=message,
        )

    # ---- driver: plan ---------------------------------------------------------------------

    def plan(self) -> Plan:
        path = self.inputs["annotations"]
        data, self._source = load_json_input(path, "annotations", self.fix)
        inputs = [self._source]
        rows: list[QuarantineRow] = []
        if self.flavor in ("grandf", "psg"):
            entries = self._entries_grandf(data, rows)
        elif self.flavor == "refcocog":
            entries = self._entries_refcocog(data, rows)
        elif self.flavor == "flickr":
            entries = self._entries_flickr(data, rows)
        else:
            entries, caption_file = self._entries_eval(data, rows)
            inputs.append(caption_file)

        tree = open_tree(self.inputs["images"], option="--images")
        records: list[UpstreamRecord] = []
        seen: dict[str, str] = {}
        for entry in entries:
            key = self._key(entry["image_id"])
            if key in seen:
                rows.append(self._row("record", entry["image_id"], "", key, "duplicate_id",
                                      f"image {entry['image_id']!r} listed again ({entry['file_name']}); the first entry was kept"))
                continue
            seen[key] = entry["file_name"]
            entry["split"] = self._split()
            records.append(UpstreamRecord(
                key=key, record_id=str(entry["image_id"]), image_name=entry["file_name"],
                est_bytes=estimate_bytes(tree, entry["file_name"]), payload=entry,
            ))
        records.sort(key=lambda r: r.key)
        return Plan(records=records, quarantine=rows, inputs=inputs, splits=[self._split()])

    def _bad_entry(self, rows: list[QuarantineRow], where: str, entry: Any, what: str) -> None:
        rows.append(self._row("record", where, "", "", "invalid_annotation", f"{where}: {what}: {str(entry)[:200]}"))

    def _entries_grandf(self, data: Any, rows: list[QuarantineRow]) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            raise InputError(f"--annotations: {self.inputs['annotations']} must be a JSON list of images; {self.fix}")
        out = []
        for i, entry in enumerate(data):
            ok = (isinstance(entry, dict) and isinstance(entry.get("image_id"), (int, str))
                  and isinstance(entry.get("file_name"), str) and isinstance(entry.get("caption"), str)
                  and isinstance(entry.get("groundings"), dict))
            if not ok:
                self._bad_entry(rows, f"[{i}]", entry, "needs image_id, file_name, caption, groundings")
                continue
            phrases = []
            for j, (phrase, g) in enumerate(entry["groundings"].items()):
                g = g if isinstance(g, dict) else {}
                phrases.append({"part_id": j, "phrase": phrase, "span": g.get("token_positives"),
                                "segmentation": g.get("rle_masks"), "find": False})
            out.append({"image_id": entry["image_id"], "file_name": entry["file_name"], "caption": entry["caption"],
                        "hw": _hw(entry), "phrases": phrases})
        return out

    def _entries_refcocog(self, data: Any, rows: list[QuarantineRow]) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            raise InputError(f"--annotations: {self.inputs['annotations']} must be a JSON list; {self.fix}")
        out = []
        for i, wrapper in enumerate(data):
            entry = next(iter(wrapper.values())) if isinstance(wrapper, dict) and len(wrapper) == 1 else None
            ok = (isinstance(entry, dict) and isinstance(entry.get("img_file_name"), str)
                  and isinstance(entry.get("caption"), str) and isinstance(entry.get("refs"), list))
            if not ok:
                self._bad_entry(rows, f"[{i}]", wrapper, "needs {id: {img_file_name, caption, refs}}")
                continue
            image_id = entry.get("image_id", Path(entry["img_file_name"]).stem)
            phrases = []
            for j, ref in enumerate(entry["refs"]):
                ref = ref if isinstance(ref, dict) else {}
                phrases.append({"part_id": j, "phrase": ref.get("sentence"), "span": None,
                                "segmentation": ref.get("segmentation"), "find": True})
            out.append({"image_id": image_id, "file_name": entry["img_file_name"], "caption": entry["caption"],
                        "hw": _hw(entry), "phrases": phrases, "outer_key": str(next(iter(wrapper)))})
        return out

    def _entries_flickr(self, data: Any, rows: list[QuarantineRow]) -> list[dict[str, Any]]:
        require_keys(data, ["images", "annotations"], self.inputs["annotations"], "annotations", self.fix)
        images: dict[Any, dict[str, Any]] = {}
        for i, img in enumerate(data["images"]):
            ok = (isinstance(img, dict) and isinstance(img.get("id"), (int, str))
                  and isinstance(img.get("file_name"), str) and isinstance(img.get("caption"), str))
            if not ok:
                self._bad_entry(rows, f"images[{i}]", img, "needs id, file_name, caption")
                continue
            if img["id"] in images:
                rows.append(self._row("record", img["id"], "", self._key(img["id"]), "duplicate_id",
                                      f"image id {img['id']} listed again (images[{i}]); the first entry was kept"))
                continue
            images[img["id"]] = img
        anns: dict[Any, list[dict[str, Any]]] = {k: [] for k in images}
        for i, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if image_id not in images:
                rows.append(self._row("part", image_id, ann.get("id") if isinstance(ann, dict) else f"annotations[{i}]",
                                      "", "orphan_annotation", f"annotations[{i}] points at image id {image_id!r}, which `images` lacks"))
                continue
            anns[image_id].append(ann)
        out = []
        for image_id in sorted(images, key=lambda v: (str(type(v)), v)):
            img = images[image_id]
            caption = normalise(img["caption"])
            if len(caption.split(" ")) < 3:  # X-SAM and GLaMM drop these
                rows.append(self._row("record", image_id, "", self._key(image_id), "upstream_filter",
                                      f"caption {img['caption']!r} has fewer than 3 words (X-SAM/GLaMM drop it)"))
                continue
            if not anns[image_id]:
                rows.append(self._row("record", image_id, "", self._key(image_id), "missing_annotation",
                                      "the image has no grounding annotation (X-SAM drops it)"))
                continue
            phrases = []
            for ann in anns[image_id]:
                tp = ann.get("tokens_positive")
                span = tp[0] if isinstance(tp, list) and tp else None
                phrases.append({"part_id": ann.get("id"), "phrase": None, "span": span,
                                "segmentation": ann.get("sam_mask"), "find": False})
            out.append({"image_id": image_id, "file_name": img["file_name"], "caption": img["caption"],
                        "hw": _hw(img), "phrases": phrases})
        return out

    def _entries_eval(self, data: Any, rows: list[QuarantineRow]) -> tuple[list[dict[str, Any]], InputFile]:
        mask_path = Path(self.inputs["annotations"])
        require_keys(data, ["images", "annotations"], mask_path, "annotations", self.fix)
        cap_path = self.inputs.get("src") or str(mask_path.with_name(mask_path.name.replace("_mask_gt", "_caption_gt")))
        cap_fix = "pass the caption GT ({split}_gcg_coco_caption_gt.json) with --src"
        caps, cap_file = load_json_input(cap_path, "src", cap_fix)
        require_keys(caps, ["annotations"], cap_path, "src", cap_fix)
        captions: dict[Any, dict[str, Any]] = {}
        for ann in caps["annotations"]:
            if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann.get("image_id") not in captions:
                captions[ann.get("image_id")] = ann
        anns: dict[Any, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if isinstance(ann, dict):
                anns.setdefault(ann.get("image_id"), []).append(ann)
        out = []
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not isinstance(img.get("id"), (int, str)):
                self._bad_entry(rows, f"images[{i}]", img, "needs an id")
                continue
            image_id = img["id"]
            cap = captions.get(image_id)
            if cap is None:
                rows.append(self._row("record", image_id, "", self._key(image_id), "missing_annotation",
                                      f"the caption GT {Path(cap_path).name} has no caption for image {image_id!r}"))
                continue
            labels = cap.get("labels") if isinstance(cap.get("labels"), list) else []
            out.append({
                "image_id": image_id, "file_name": img.get("file_name") or f"{image_id}.jpg",
                "caption": cap["caption"], "hw": _hw(img), "labels": [str(v) for v in labels],
                "masks": [{"id": a.get("id"), "segmentation": a.get("segmentation"), "bbox": a.get("bbox"),
                           "area": a.get("area")} for a in anns.get(image_id, [])],
            })
        return out, cap_file

    # ---- worker: convert ------------------------------------------------------------------

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        p = upstream.payload
        data, info = read_image(cached_tree(self.inputs["images"], "--images"), p["file_name"], options)
        image = image_model(data, info, p["file_name"], tuple(p["hw"]) if p["hw"] else None)
        if self.flavor == "eval":
            return self._convert_eval(upstream, image, data)
        h, w = image.height, image.width
        parts: list[QuarantineRow] = []

        def part(part_id: Any, reason: str, message: str) -> None:
            parts.append(self._row("part", upstream.record_id, part_id, upstream.key, reason, message))

        caption = normalise(p["caption"])
        candidates: list[tuple[int, int, int]] = []  # (start, end, index into p["phrases"])
        rles: dict[int, RLE] = {}
        for i, ph in enumerate(p["phrases"]):
            pid = ph["part_id"]
            if ph["find"]:  # RefCOCOg: locate the sentence
                if not isinstance(ph["phrase"], str):
                    part(pid, "invalid_annotation", f"ref {pid} has no sentence")
                    continue
                phrase = normalise(ph["phrase"])
                start = caption.find(phrase) if phrase else -1
                if start < 0:
                    part(pid, "upstream_filter", f"sentence {phrase!r} is not in the caption (X-SAM drops it)")
                    continue
                span = [start, start + len(phrase)]
            else:
                span = ph["span"]
                ok = (isinstance(span, list) and len(span) == 2
                      and all(isinstance(v, int) and not isinstance(v, bool) for v in span))
                if not ok or not 0 <= span[0] < span[1] <= len(caption):
                    part(pid, "invalid_annotation", f"character span {span!r} is not [start, end] inside the caption (length {len(caption)})")
                    continue
                if isinstance(ph["phrase"], str) and normalise(ph["phrase"]) not in caption:
                    part(pid, "upstream_filter", f"phrase {normalise(ph['phrase'])!r} is not in the caption (X-SAM drops it)")
                    continue
            rle, reason, message = _union(ph["segmentation"], h, w)
            if rle is None:
                part(pid, reason, message)
                continue
            rles[i] = rle
            candidates.append((span[0], span[1], i))

        kept, dropped = keep_non_overlapping(candidates)
        span_of = {i: (s, e) for s, e, i in candidates}
        for i in dropped:
            s, e = span_of[i]
            part(p["phrases"][i]["part_id"], "upstream_filter",
                 f"span [{s}, {e}] ({caption[s:e]!r}) overlaps or touches an earlier kept span (X-SAM keeps the earliest)")
        if not kept:
            raise RecordRejected("missing_annotation", "no grounded phrase is left (X-SAM drops the image)")

        segments, phrases, spans = [], [], []
        for k, i in enumerate(kept):
            s, e = span_of[i]
            pid = p["phrases"][i]["part_id"]
            rle = rles[i]
            segments.append(Segment(
                id=pid if isinstance(pid, int) and not isinstance(pid, bool) else i, rle=rle,
                bbox=masks.bbox(rle), area=float(masks.area(rle)), phrase_index=k,
            ))
            phrases.append(caption[s:e])
            spans.append([s, e])
        meta: dict[str, Any] = {
            "flavor": self.flavor,
            "phrase_char_spans": spans,
            "phrase_segments": [[k] for k in range(len(kept))],
            "caption_upstream": p["caption"],
        }
        if self.flavor in ("grandf", "psg"):
            meta["upstream_phrases"] = [p["phrases"][i]["phrase"] for i in kept]
        if "outer_key" in p:
            meta["upstream_key"] = p["outer_key"]
        record = Record(
            key=upstream.key, task=self.task, source=self._source_of(upstream), image=image,
            segments=segments, phrases=phrases, captions=[caption], meta=meta,
        )
        return Converted(record=record, image_bytes=data, parts=parts)

    def _convert_eval(self, upstream: UpstreamRecord, image: Any, data: bytes) -> Converted:
        p = upstream.payload
        h, w = image.height, image.width
        parts: list[QuarantineRow] = []
        segments: list[Segment] = []
        for n, ann in enumerate(p["masks"]):
            aid = ann["id"] if isinstance(ann["id"], int) and not isinstance(ann["id"], bool) else None
            rle, reason, message = polygon_or_rle(ann["segmentation"], h, w)
            if rle is None or aid is None:
                parts.append(self._row("part", upstream.record_id, ann["id"], upstream.key,
                                       reason or "invalid_annotation", message or "annotation id is not an integer"))
                continue
            bbox = ann["bbox"] if isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4 else list(masks.bbox(rle))
            area = ann["area"] if isinstance(ann["area"], (int, float)) else masks.area(rle)
            segments.append(Segment(id=aid, rle=rle, category_id=1, category_name="object",
                                    bbox=tuple(float(v) for v in bbox), area=float(area)))
        caption = p["caption"]
        lower = caption.lower()
        labels = p["labels"]
        aligned = len(labels) == len(p["masks"]) == len(segments)
        phrases, spans, targets, cursor = [], [], [], 0
        for i, label in enumerate(labels):
            start = lower.find(label.lower(), cursor) if label else -1
            if start < 0 or len(lower) != len(caption):
                continue
            end = start + len(label)
            phrases.append(caption[start:end])
            spans.append([start, end])
            targets.append([i] if aligned else [])
            if aligned:
                segments[i].phrase_index = len(phrases) - 1
            cursor = end
        meta = {"flavor": "eval", "gt_labels": labels, "phrase_char_spans": spans, "phrase_segments": targets}
        record = Record(
            key=upstream.key, task=self.task, source=self._source_of(upstream), image=image,
            segments=segments, phrases=phrases, captions=[caption], meta=meta,
        )
        return Converted(record=record, image_bytes=data, parts=parts)

    def _source_of(self, upstream: UpstreamRecord) -> Source:
        image_id = upstream.payload["image_id"]
        return Source(
            corpus=self.name, split=upstream.payload["split"], upstream_ids={"image_id": image_id},
            annotation_file=self._source.name, annotation_sha256=self._source.sha256,
        )


def _hw(entry: dict[str, Any]) -> list[int] | None:
    h, w = entry.get("height"), entry.get("width")
    try:
        return [int(h), int(w)] if h is not None and w is not None else None
    except (TypeError, ValueError):
        return None


def _union(segmentation: Any, h: int, w: int) -> tuple[RLE | None, str | None, str]:
    """X-SAM `decode_mask`: one RLE, a list of RLEs or a list of polygons -> their union
    (`polygon_or_rle` does each; a list mixing RLEs and polygons is refused)."""
    if isinstance(segmentation, list) and segmentation:
        kinds = {type(s) for s in segmentation}
        if kinds not in ({list}, {dict}):
            return None, "invalid_annotation", f"mixed segmentation list: {str(segmentation)[:120]}"
    elif not isinstance(segmentation, dict):
        return None, "invalid_annotation", f"segmentation is neither RLE(s) nor polygons: {str(segmentation)[:120]}"
    return polygon_or_rle(segmentation, h, w)


CONVERTER_CLASSES = (Gcg,)
