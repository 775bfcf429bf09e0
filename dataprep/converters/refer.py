"""RefCOCO / RefCOCO+ / RefCOCOg (REFER) and gRefCOCO -> refseg records.

Upstream layout (lichengunc/refer `data/README.md` + `refer.py`; henghuiding/gRefCOCO `grefer.py`):
a dataset folder with `instances.json` (COCO train2014 instances: `images`, `annotations` with
polygon segmentation, `categories`) and a refs file:

- `refs(unc).p`, `refs(umd).p`, `refs(google).p`: a Python 2 pickle (protocol 2) holding a list of
  refs `{ref_id, ann_id, image_id, category_id, split, file_name, sent_ids, sentences[{sent_id, sent,
  raw, tokens}]}`. It is read by `dataprep.safe_pickle` (no global is ever imported, latin-1 str),
  never by `pickle.load`. The file name tells the partition (`unc`, `umd`, `google`), recorded as
  the dataset parameter `partition`.
- `grefs(unc).json` (gRefCOCO; X-SAM's pickled copy, `grefcoco/refs(unc).p` from the Hugging Face
  dataset `gRefCOCO/gRefCOCO`, is read the same safe way): refs whose `ann_id` is a LIST of targets;
  a no-target expression has `ann_id: [-1]` and/or `no_target: true`. Checked against a real record
  (ref 135 of the val split, pasted in henghuiding/gRefCOCO issue #12): `ann_id: [-1]`,
  `category_id: [-1]`, `no_target: true`, `sent_ids`, `sentences[{raw, sent, sent_id, tokens}]`.
  The release also holds refs with no sentence (gRefCOCO issues #3 and #8; its maintainers say to
  skip them): they are dropped as part-level `upstream_filter` rows. An annotation whose
  `segmentation` is a list of RLE pieces is their union (as gRefCOCO's reference loader and LISA
  read it).

Record layout: ONE record per (image, split), key `make_key(KEY, split, image_id)` with KEY =
`refcoco`, `refcocop` (RefCOCO+: `+` is not a key character, and `make_key` would turn it into
`_`), `refcocog`, `grefcoco`; the upstream split (`train`, `val`, `testA`, `testB`, `test`) is
kept as written in `Source.split` (the key lowercases it).

- `segments`: the referred objects (each target annotation once, sorted by annotation id), mask =
  the instances polygon rasterised exactly as pycocotools `annToMask` (`frPyObjects` + `merge`;
  RLE kept losslessly), upstream `bbox`/`area`; `phrase_index` is None (an object has several
  sentences: the relation is `meta["phrase_segments"]`).
- `phrases`: every sentence (`sent`, REFER's normalised text) of every ref of the image and
  split, refs in upstream file order and sentences in ref order. NOT deduplicated: the REFER and
  gRefCOCO (ReLA) evaluations score every sentence id, duplicates included, so the evaluation items
  match their counts. (X-SAM's own gRefCOCO evaluation drops no-target refs and duplicate sentences
  per ref; ours keeps both, so N-acc can be reported.)
- `meta["phrase_segments"]`: per phrase, the indices of the segments it refers to (`[]` for a
  gRefCOCO no-target expression, which is KEPT; the renderer answers it with
  `refseg.grefseg_no_target`); `meta["sent_ids"]` and `meta["ref_ids"]`: the upstream sentence and
  ref id of each phrase.
- No `ignore` mask (REFER scores the referred mask alone).

Quarantine. Driver side: malformed refs or sentences, refs whose annotation is missing or lies on
another image, and unknown categories are dropped as parts; an (image, split) whose image is not
in `instances.json` is a record-level `orphan_annotation`, and one whose every ref was dropped is
rejected with the first reason. Worker side: a target annotation without a usable mask
(`degenerate_polygon`, `empty_mask`, ...) drops it and every expression referring to it (parts);
nothing left rejects the record.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, ClassVar

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
from dataprep.converters.coco_instances import category_table, image_entries, polygon_or_rle
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.safe_pickle import load_data_pickle
from dataprep.sources import open_tree
from xsam.data import masks
from xsam.data.schema import IMAGE_TOKEN, PHRASE_END, PHRASE_START, REGION_TOKEN, SEG_TOKEN, Record, Segment, Source, make_key

FIX_INSTANCES = "pass the instances.json of the REFER dataset folder (COCO train2014 instances)"
FIX_REFS = "pass the REFER refs file, e.g. refcoco/refs(unc).p (or gRefCOCO's grefs(unc).json)"
_RESERVED = (IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN, PHRASE_START, PHRASE_END)
_PARTITION = re.compile(r"refs\(([a-z0-9_]+)\)")


def partition_of(path: str | Path) -> str:
    """`refs(unc).p` -> `unc`; `grefs(unc).json` -> `unc`; InputError when the name does not say."""
    match = _PARTITION.search(Path(str(path)).name.lower())
    if not match:
        raise InputError(
            f"--refs: cannot tell the partition from the file name {Path(str(path)).name!r}; keep the upstream "
            "name, e.g. 'refs(unc).p', 'refs(umd).p', 'refs(google).p' or 'grefs(unc).json'"
        )
    return match.group(1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Refer(Converter):
    """What the four REFER-style corpora share (see the module doc)."""

    task = "refseg"
    version = "2"  # 2: refs without sentences are upstream_filter; RLE-piece lists are unions
    key_name: ClassVar[str]
    generalized: ClassVar[bool] = False
    required_inputs = {
        "refs": "REFER refs file: 'refs(unc).p' / 'refs(umd).p' / 'refs(google).p' (Python 2 pickle, read safely)",
        "instances": "the dataset folder's instances.json (COCO train2014 instances, polygons)",
        "images": "folder or .zip/.tar of the COCO train2014 images",
    }
    optional_inputs = {"split": "convert only this upstream split (e.g. train, val, testA); default: every split"}

    # ---- inputs -----------------------------------------------------------------------------

    def parameters(self) -> dict[str, Any]:
        return {"partition": partition_of(self.inputs["refs"]), "split": self.inputs.get("split") or "all"}

    def _load_refs(self) -> tuple[Any, InputFile]:
        path = Path(self.inputs["refs"])
        if not path.is_file():
            raise InputError(f"--refs: file not found: {path}; {FIX_REFS}")
        with open(path, "rb") as f:
            head = f.read(1)
        if head == b"\x80" or path.suffix.lower() in (".p", ".pkl", ".pickle"):
            refs, raw = load_data_pickle(path, option="refs")
            source = InputFile(option="refs", name=path.name, sha256=hashlib.sha256(raw).hexdigest())
        else:
            refs, source = load_json_input(path, "refs", FIX_REFS)
        if not isinstance(refs, list):
            raise InputError(f"--refs: {path.name} holds a {type(refs).__name__}, not a list of refs; {FIX_REFS}")
        return refs, source

    def _row(self, level: str, record_id: Any, part_id: Any, key: str, reason: str, message: str) -> QuarantineRow:
        return QuarantineRow(
            level=level, source_file=self._source.name, record_id=str(record_id), part_id=str(part_id),
            key=key, reason=reason, message=message,
        )

    # ---- driver side ------------------------------------------------------------------------

    def _targets(self, ref: dict[str, Any]) -> list[int] | None:
        """The ref's target annotation ids ([] = no target), None when malformed."""
        ann = ref.get("ann_id")
        if not self.generalized:
            return [ann] if _is_int(ann) and ann >= 0 else None
        ids = ann if isinstance(ann, list) else [ann]
        if not all(_is_int(a) for a in ids):
            return None
        targets = sorted({a for a in ids if a != -1})
        if ref.get("no_target") is True and targets:
            return None  # says both "no target" and names targets
        return targets

    def _sentences(self, ref: dict[str, Any], ref_id: Any) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
        kept, bad = [], []
        sentences = ref.get("sentences")
        if not isinstance(sentences, list):
            return [], [(f"ref:{ref_id}", "`sentences` is not a list")]
        for j, sent in enumerate(sentences):
            sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
            text = sent.get("sent") if isinstance(sent, dict) else None
            part = f"sent:{sent_id}" if _is_int(sent_id) else f"ref:{ref_id}:sentences[{j}]"
            if not isinstance(text, str) or not text.strip():
                bad.append((part, f"sentence {j} of ref {ref_id} has no text (`sent`): {str(sent)[:120]}"))
            elif any(t in text for t in _RESERVED):
                bad.append((part, f"sentence {j} of ref {ref_id} holds a reserved string: {text[:120]!r}"))
            else:
                kept.append({"sent_id": sent_id if _is_int(sent_id) else None, "sent": text})
        return kept, bad

    def plan(self) -> Plan:
        inst_path = self.inputs["instances"]
        inst, instances_file = load_json_input(inst_path, "instances", FIX_INSTANCES)
        require_keys(inst, ["images", "annotations", "categories"], inst_path, "instances", FIX_INSTANCES)
        refs, self._source = self._load_refs()
        self._categories = category_table(inst["categories"], inst_path, "instances", FIX_INSTANCES)
        images, rows = image_entries(inst["images"], corpus=self.key_name, split="instances", source_file=instances_file.name)
        for row in rows:
            row.key = ""  # an instances.json image is not a record by itself (records are image x split)
        if not isinstance(inst["annotations"], list):
            raise InputError(f"--instances: {inst_path}: `annotations` must be a list; {FIX_INSTANCES}")
        anns: dict[int, dict[str, Any]] = {}
        for i, ann in enumerate(inst["annotations"]):
            if not (isinstance(ann, dict) and _is_int(ann.get("id"))):
                continue  # only annotations that a ref names matter; a ref naming a bad one is an orphan
            if ann["id"] in anns:
                rows.append(QuarantineRow(
                    level="part", source_file=instances_file.name, record_id=str(ann.get("image_id")),
                    part_id=f"ann:{ann['id']}", key="", reason="duplicate_id",
                    message=f"annotation id {ann['id']} listed again (annotations[{i}]); the first one was kept",
                ))
                continue
            anns[ann["id"]] = ann
        only_split = self.inputs.get("split")

        units: dict[tuple[str, int], dict[str, Any]] = {}
        for i, ref in enumerate(refs):
            ref_id = ref.get("ref_id", f"refs[{i}]") if isinstance(ref, dict) else f"refs[{i}]"
            image_id = ref.get("image_id") if isinstance(ref, dict) else None
            split = ref.get("split") if isinstance(ref, dict) else None
            if not _is_int(image_id) or not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
                rows.append(self._row("part", image_id, f"ref:{ref_id}", "", "invalid_annotation",
                                      f"refs[{i}] lacks an integer image_id or a split name: {str(ref)[:200]}"))
                continue
            if only_split and split != only_split:
                continue
            unit = units.setdefault((split, image_id), {"refs": [], "bad": []})
            key = make_key(self.key_name, split, image_id)

            def bad(reason: str, message: str, part: Any = f"ref:{ref_id}", unit=unit, key=key) -> None:
                unit["bad"].append(self._row("part", image_id, part, key, reason, message))

            targets = self._targets(ref)
            if targets is None:
                bad("invalid_annotation", f"ref {ref_id}: ann_id {ref.get('ann_id')!r} (no_target "
                    f"{ref.get('no_target')!r}) is not {'a list of annotation ids' if self.generalized else 'an annotation id'}")
                continue
            missing = [a for a in targets if a not in anns or anns[a].get("image_id") != image_id]
            if missing:
                where = "is not in" if missing[0] not in anns else f"lies on image {anns[missing[0]].get('image_id')} in"
                bad("orphan_annotation", f"ref {ref_id}: target annotation {missing[0]} {where} {instances_file.name} (image {image_id})")
                continue
            unknown = [a for a in targets if anns[a].get("category_id") not in self._categories]
            if unknown:
                bad("unknown_category", f"ref {ref_id}: annotation {unknown[0]} has category_id "
                    f"{anns[unknown[0]].get('category_id')!r}, which `categories` lacks")
                continue
            sentences, bad_sents = self._sentences(ref, ref_id)
            for part, message in bad_sents:
                bad("invalid_annotation", message, part)
            if not sentences:
                if not bad_sents:  # released as such (gRefCOCO val); its maintainers say to skip them
                    bad("upstream_filter", f"ref {ref_id} has no sentences (an empty upstream ref: skipped)")
                continue
            unit["refs"].append({"ref_id": ref_id, "targets": targets, "sentences": sentences})

        tree = open_tree(self.inputs["images"], option="--images")
        records: list[UpstreamRecord] = []
        splits: set[str] = set()
        for (split, image_id), unit in units.items():
            key = make_key(self.key_name, split, image_id)
            img = images.get(image_id)
            if img is None:
                rows.append(self._row("record", image_id, "", key, "orphan_annotation",
                                      f"{len(unit['refs']) + len(unit['bad'])} ref(s) of split {split} point at image "
                                      f"{image_id}, which {instances_file.name} `images` lacks"))
                continue
            if not unit["refs"]:
                first = unit["bad"][0]
                rows.append(self._row("record", image_id, "", key, first.reason,
                                      f"every expression of image {image_id} ({split}) was rejected; first: {first.message}"))
                continue
            rows.extend(unit["bad"])
            used = sorted({a for ref in unit["refs"] for a in ref["targets"]})
            splits.add(split)
            records.append(
                UpstreamRecord(
                    key=key, record_id=str(image_id), image_name=img["file_name"],
                    est_bytes=estimate_bytes(tree, img["file_name"]),
                    payload={"image": img, "split": split, "refs": unit["refs"], "annotations": [anns[a] for a in used]},
                )
            )
        records.sort(key=lambda r: r.key)
        cats = self._categories
        return Plan(
            records=records, quarantine=rows, inputs=[self._source, instances_file],
            categories=[cats[c] for c in sorted(cats)], splits=sorted(splits),
        )

    # ---- worker side ------------------------------------------------------------------------

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        payload = upstream.payload
        img = payload["image"]
        data, info = read_image(cached_tree(self.inputs["images"], "--images"), img["file_name"], options)
        expect = (img.get("height"), img.get("width"))
        image = image_model(data, info, img["file_name"], expect if None not in expect else None)
        h, w = image.height, image.width
        parts: list[QuarantineRow] = []

        def part(part_id: Any, reason: str, message: str) -> None:
            parts.append(self._row("part", upstream.record_id, part_id, upstream.key, reason, message))

        masks_by_ann: dict[int, Any] = {}
        failed: dict[int, tuple[str, str]] = {}
        for ann in payload["annotations"]:
            rle, reason, message = polygon_or_rle(ann.get("segmentation"), h, w)
            if rle is None:
                failed[ann["id"]] = (reason or "invalid_annotation", message)
                part(f"ann:{ann['id']}", reason or "invalid_annotation", message)
            else:
                masks_by_ann[ann["id"]] = rle

        phrases: list[str] = []
        targets_of: list[list[int]] = []
        sent_ids: list[int | None] = []
        ref_ids: list[Any] = []
        for ref in payload["refs"]:
            broken = [a for a in ref["targets"] if a in failed]
            if broken:
                reason, message = failed[broken[0]]
                part(f"ref:{ref['ref_id']}", reason, f"expression(s) dropped: target annotation {broken[0]} has no mask ({message})")
                continue
            for sent in ref["sentences"]:
                phrases.append(sent["sent"])
                targets_of.append(ref["targets"])
                sent_ids.append(sent["sent_id"])
                ref_ids.append(ref["ref_id"])
        if not phrases:
            reason, message = next(iter(failed.values()))
            raise RecordRejected(reason, f"no expression left: every target mask failed; first: {message}")

        used = sorted({a for t in targets_of for a in t})
        index = {a: i for i, a in enumerate(used)}
        by_id = {ann["id"]: ann for ann in payload["annotations"]}
        segments = []
        for ann_id in used:
            ann = by_id[ann_id]
            rle = masks_by_ann[ann_id]
            cat = self._categories[ann["category_id"]]
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                bbox = list(masks.bbox(rle))
            area = ann.get("area")
            if not isinstance(area, (int, float)) or area < 0:
                area = masks.area(rle)
            segments.append(
                Segment(
                    id=ann_id, rle=rle, category_id=cat["id"], category_name=cat["name"], isthing=cat["isthing"],
                    iscrowd=bool(ann.get("iscrowd", 0)), bbox=tuple(float(v) for v in bbox), area=float(area),
                )
            )
        record = Record(
            key=upstream.key,
            task=self.task,
            source=Source(
                corpus=self.name, split=payload["split"], upstream_ids={"image_id": img["id"]},
                annotation_file=self._source.name, annotation_sha256=self._source.sha256,
            ),
            image=image,
            segments=segments,
            phrases=phrases,
            meta={
                "phrase_segments": [[index[a] for a in t] for t in targets_of],
                "sent_ids": sent_ids,
                "ref_ids": ref_ids,
            },
        )
        return Converted(record=record, image_bytes=data, parts=parts)


class RefCoco(_Refer):
    name = "refcoco"
    key_name = "refcoco"
    example = (
        "xsam data convert refcoco --out data/refcoco --refs 'refcoco/refs(unc).p' "
        "--instances refcoco/instances.json --images train2014"
    )


class RefCocoPlus(_Refer):
    name = "refcoco+"
    key_name = "refcocop"  # '+' is not a key character
    example = (
        "xsam data convert refcoco+ --out data/refcocop --refs 'refcoco+/refs(unc).p' "
        "--instances refcoco+/instances.json --images train2014"
    )


class RefCocog(_Refer):
    name = "refcocog"
    key_name = "refcocog"
    example = (
        "xsam data convert refcocog --out data/refcocog --refs 'refcocog/refs(umd).p' "
        "--instances refcocog/instances.json --images train2014"
    )


class GRefCoco(_Refer):
    name = "grefcoco"
    key_name = "grefcoco"
    generalized = True
    required_inputs = {
        **_Refer.required_inputs,
        "refs": "gRefCOCO refs: 'grefs(unc).json' (or X-SAM's pickled 'refs(unc).p' of gRefCOCO, read safely)",
    }
    example = (
        "xsam data convert grefcoco --out data/grefcoco --refs 'grefcoco/grefs(unc).json' "
        "--instances grefcoco/instances.json --images train2014"
    )


CONVERTER_CLASSES = (RefCoco, RefCocoPlus, RefCocog, GRefCoco)
