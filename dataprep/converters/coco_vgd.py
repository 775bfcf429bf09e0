"""COCO-VGD (X-SAM visual grounded segmentation) -> vgdseg records, prompts stored as geometry + seed.

Inputs (`--annotations`, format detected from the JSON's shape):
- a COCO instances file (`instances_{train,val}2017.json`, https://cocodataset.org/#format-data): the
  four prompts of every non-crowd instance are GENERATED here as X-SAM's
  `xsam/xsam/dataset/utils/vprompt.py` does (see `xsam.data.vprompts`), with a seed that is a pure
  function of (record key, annotation id, kind), so two conversions are byte-identical (spec §7
  pitfall 5: upstream draws them unseeded);
- X-SAM's published pre-generated `img_vgdseg_coco_{train,val}.json` (format read from
  `xsam/xsam/dataset/img_vgdseg_dataset.py`: a JSON list of `{image_file, image_id, image_size [h, w],
  image_info{id, file_name, height, width}, annotations[{id, category_id, bbox, iscrowd,
  segmentation (RLE or polygons), visual_prompts{point_visual_prompt, scribble_visual_prompt,
  box_visual_prompt, mask_visual_prompt: RLE}}]}`): the prompt RLEs are kept unchanged (no
  geometry); that file has no category table, so names come from `--instances` (a COCO instances
  file) when given.

Record layout (one record per image, key `coco-vgd-<split>-<image id>`):
- segments: every annotation (crowd ones with `iscrowd=True`, OR-ed into `ignore`, and no prompts);
  `phrases` = category names (first appearance order), `Segment.phrase_index` its category;
- visual_prompts: per non-crowd instance (id order), kinds point, scribble, box, mask:
  point/scribble/box = `geometry` (+ `seed`, `rle=None`); mask = `rle` of X-SAM's blurred mask
  (deterministic, kept as RLE because rasterising needs the instance mask) with geometry
  `{"from_segment": id}`. `geometry["from_segment"]` names the instance the prompt was drawn from;
  `segment_ids` = every non-crowd instance of its category (a VGD region targets all instances of
  the category), `phrase_index` = its category. A kind that draws nothing (components <= 5 px)
  is left out, as X-SAM skips empty prompts.
- `--flavor point|scribble|box|mask` keeps one kind only (per-type evaluation datasets).
- meta: `vprompt` = the generator parameters.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Plan,
    UpstreamRecord,
    estimate_bytes,
)
from dataprep.converters.coco_instances import (
    CocoJsonConverter,
    category_table,
    image_entries,
    polygon_or_rle,
)
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.sources import open_tree
from xsam.data import masks, vprompts
from xsam.data.schema import RLE, Record, Segment, VisualPrompt, make_key

FIX_VGD = (
    "pass a COCO instances file (annotations/instances_val2017.json) or X-SAM's pre-generated "
    "coco_vgd/annotations/img_vgdseg_coco_val.json"
)
FLAVORS = vprompts.KINDS
XSAM_KEYS = {f"{k}_visual_prompt": k for k in vprompts.KINDS}


def flavor_kinds(flavor: str | None, name: str) -> tuple[str, ...]:
    if not flavor:
        return vprompts.KINDS
    if flavor not in FLAVORS:
        raise InputError(
            f"{name}: --flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}"
        )
    return (flavor,)


def prompt_counts_problems(values: list[Any], h: int, w: int) -> dict[str, str | None]:
    """`masks.counts_problems` of every compressed-RLE prompt among `values` (a record's prompts, in
    one pass), by counts string: what `prompt_rle` takes as `problems`."""
    strings = [v["counts"] for v in values if isinstance(v, dict) and isinstance(v.get("counts"), str)]
    return dict(zip(strings, masks.counts_problems(strings, h * w)))


def prompt_rle(
    value: Any, h: int, w: int, problems: dict[str, str | None] | None = None
) -> tuple[RLE | None, str, str]:
    """An upstream prompt mask -> (RLE, "", "") kept byte-for-byte when it is compressed RLE, or
    (None, reason, message). Polygons and uncompressed RLE are normalised to compressed RLE.
    `problems` (`prompt_counts_problems`) holds the run check of compressed counts done already."""
    if (
        isinstance(value, dict)
        and isinstance(value.get("counts"), str)
        and "size" in value
    ):
        if [int(v) for v in value["size"]] != [h, w]:
            return (
                None,
                "size_mismatch",
                f"prompt RLE size {value['size']} != image [h, w] [{h}, {w}]",
            )
        counts = value["counts"]
        if problems is None or counts not in problems:
            problems = prompt_counts_problems([value], h, w)
        problem = problems[counts]
        if problem is not None:  # pycocotools would decode it from uninitialised memory
            return None, "invalid_annotation", f"unreadable prompt RLE: {problem}"
        rle = RLE(size=(h, w), counts=counts)
        try:
            empty = masks.area(rle) == 0
        except Exception as err:  # noqa: BLE001 - pycocotools raises bare errors on garbage
            return None, "invalid_annotation", f"unreadable prompt RLE: {err}"
        return (
            (None, "empty_mask", "prompt mask covers no pixel")
            if empty
            else (rle, "", "")
        )
    rle, reason, message = polygon_or_rle(value, h, w)
    return rle, reason or "", message


class CocoVgd(CocoJsonConverter):
    name = "coco-vgd"
    task = "vgdseg"
    version = "2"  # 2: prompt geometry from det_sin/det_cos (vprompts.GENERATOR v2)
    required_inputs = {
        "images": "folder or .zip/.tar of the COCO images (e.g. val2017/)",
        "annotations": "COCO instances JSON (prompts generated, seeded) or X-SAM's img_vgdseg_coco_*.json",
    }
    optional_inputs = {
        "split": "split name for the record keys (default: from the file names, e.g. val2017)",
        "flavor": "keep one prompt kind only: point | scribble | box | mask (per-type evaluation data)",
        "instances": "COCO instances JSON for category names when --annotations is X-SAM's pre-generated file",
    }
    example = "xsam data convert coco-vgd --out data/coco-vgd --images val2017 --annotations annotations/instances_val2017.json"
    fix = FIX_VGD

    def parameters(self) -> dict[str, Any]:
        return {
            "split": self._split(),
            "flavor": self.inputs.get("flavor") or "all",
            "vprompt": self._vprompt_meta(),
        }

    @staticmethod
    def _vprompt_meta() -> dict[str, Any]:
        return {
            "generator": vprompts.GENERATOR,
            "point_radius": vprompts.POINT_RADIUS,
            "scribble_radius": vprompts.SCRIBBLE_RADIUS,
            "min_area": vprompts.MIN_AREA,
            "max_retries": vprompts.MAX_RETRIES,
            "mask_sigma": vprompts.MASK_SIGMA,
        }

    def plan(self) -> Plan:
        flavor_kinds(self.inputs.get("flavor"), self.name)
        from dataprep.converters.base import load_json_input

        path = self.inputs["annotations"]
        data, self._source = load_json_input(path, "annotations", self.fix)
        if isinstance(data, list):
            return self._plan_image_list(data, anns_key="annotations", fmt="xsam", empty_is_missing=False)
        if not isinstance(data, dict) or any(
            k not in data for k in ("images", "annotations", "categories")
        ):
            raise InputError(
                f"--annotations: {path} is neither a COCO instances file nor a list of X-SAM VGD records; {self.fix}"
            )
        self._categories = category_table(
            data["categories"], path, "annotations", self.fix
        )
        split = self._split()
        images, rows = image_entries(
            data["images"], corpus=self.name, split=split, source_file=self._source.name
        )
        anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        seen: set[Any] = set()
        for i, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            if image_id not in images or ann_id in seen:
                dup = image_id in images
                rows.append(
                    QuarantineRow(
                        level="part",
                        source_file=self._source.name,
                        record_id=str(image_id),
                        part_id=str(ann_id),
                        key=make_key(self.name, split, image_id) if dup else "",
                        reason="duplicate_id"
                        if dup
                        else (
                            "orphan_annotation"
                            if isinstance(ann, dict)
                            else "invalid_annotation"
                        ),
                        message=f"annotations[{i}] (id {ann_id}): "
                        + (
                            "id listed again; the first one was kept"
                            if dup
                            else f"image id {image_id} is not in `images`"
                        ),
                    )
                )
                continue
            seen.add(ann_id)
            anns_by_image[image_id].append(ann)
        tree = open_tree(self.inputs["images"], option="--images")
        records = [
            UpstreamRecord(
                key=make_key(self.name, split, image_id),
                record_id=str(image_id),
                image_name=img["file_name"],
                est_bytes=estimate_bytes(tree, img["file_name"]),
                payload={
                    "image": img,
                    "annotations": anns_by_image.get(image_id, []),
                    "split": split,
                    "format": "coco",
                },
            )
            for image_id, img in images.items()
        ]
        return self._plan(records, rows)

    def _load_instance_categories(self) -> None:
        """`--instances`: the COCO category table that names the categories (optional)."""
        self._categories = {}
        if self.inputs.get("instances"):
            from dataprep.converters.base import load_json_input

            inst, _ = load_json_input(self.inputs["instances"], "instances", "pass a COCO instances JSON")
            self._categories = category_table(
                inst.get("categories") if isinstance(inst, dict) else None,
                self.inputs["instances"],
                "instances",
                "pass a COCO instances JSON",
            )

    def _plan_image_list(self, data: list[Any], *, anns_key: str, fmt: str, empty_is_missing: bool) -> Plan:
        """Plan a JSON list of `{image_info: {...}, <anns_key>: [COCO annotations + prompts]}` records
        (X-SAM's pre-generated VGD file, PSALM's COCO-Interactive file)."""
        self._load_instance_categories()
        split = self._split()
        images = []
        for i, entry in enumerate(data):
            info = entry.get("image_info") if isinstance(entry, dict) else None
            if not isinstance(info, dict) or not isinstance(entry.get(anns_key), list):
                info = {"id": f"[{i}]"}
                anns = None
            else:
                anns = entry[anns_key]
            images.append({**info, "_annotations": anns})
        by_id, rows = image_entries(images, corpus=self.name, split=split, source_file=self._source.name)
        tree = open_tree(self.inputs["images"], option="--images")
        records = []
        for image_id, img in by_id.items():
            anns = img.pop("_annotations")
            key = make_key(self.name, split, image_id)
            if empty_is_missing and not anns:
                rows.append(
                    QuarantineRow(
                        level="record", source_file=self._source.name, record_id=str(image_id), part_id="",
                        key=key, reason="missing_annotation", message=f"image {img['file_name']}: `{anns_key}` is empty",
                    )
                )
                continue
            records.append(
                UpstreamRecord(
                    key=key,
                    record_id=str(image_id),
                    image_name=img["file_name"],
                    est_bytes=estimate_bytes(tree, img["file_name"]),
                    payload={"image": img, "annotations": anns, "split": split, "format": fmt},
                )
            )
        return self._plan(records, rows)

    # ------------------------------------------------------------------------------ worker side

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        img = upstream.payload["image"]
        data, image = self._read_record_image(upstream, options)
        h, w = image.height, image.width
        kinds = flavor_kinds(self.inputs.get("flavor"), self.name)
        parts: list[QuarantineRow] = []
        segments, crowd, names = self._annotation_segments(upstream, h, w, parts, options)
        by_cat: dict[int | None, list[int]] = defaultdict(list)
        for seg in segments:
            if not seg.iscrowd:
                by_cat[seg.category_id].append(seg.id)
        raw = {
            a.get("id"): a
            for a in upstream.payload["annotations"]
            if isinstance(a, dict)
        }
        prompts: list[VisualPrompt] = []
        for seg in segments:
            if seg.iscrowd:
                continue
            targets = by_cat[seg.category_id]
            if upstream.payload["format"] == "xsam":
                prompts += self._upstream_prompts(
                    upstream, raw[seg.id], seg, targets, kinds, h, w, parts
                )
            else:
                prompts += self._generated_prompts(upstream.key, seg, targets, kinds)
        if not prompts:
            raise RecordRejected(
                "missing_annotation",
                f"image {img['file_name']}: no instance with a visual prompt",
            )
        record = Record(
            key=upstream.key,
            task=self.task,
            source=self._record_source(upstream),
            image=image,
            segments=segments,
            ignore=masks.union(crowd, h, w) if crowd else None,
            phrases=names,
            visual_prompts=prompts,
            meta={"vprompt": self._vprompt_meta()}
            if upstream.payload["format"] == "coco"
            else {},
        )
        return Converted(record=record, image_bytes=data, parts=parts)


    @staticmethod
    def _generated_prompts(
        key: str, seg: Segment, targets: list[int], kinds: tuple[str, ...]
    ) -> list[VisualPrompt]:
        mask = masks.decode(seg.rle)
        out = []
        for kind in kinds:
            seed = vprompts.prompt_seed(key, seg.id, kind)
            if kind == "mask":
                vp_mask = vprompts.mask_prompt(mask)
                if not vp_mask.any():
                    continue
                out.append(
                    VisualPrompt(
                        kind=kind,
                        rle=masks.encode(vp_mask),
                        geometry={"from_segment": seg.id},
                        seed=seed,
                        segment_ids=list(targets),
                        phrase_index=seg.phrase_index,
                    )
                )
                continue
            geometry = vprompts.generate(mask, kind, seed)
            if geometry is None:
                continue
            out.append(
                VisualPrompt(
                    kind=kind,
                    geometry={**geometry, "from_segment": seg.id},
                    seed=seed,
                    segment_ids=list(targets),
                    phrase_index=seg.phrase_index,
                )
            )
        return out

    def _upstream_prompts(
        self,
        upstream: UpstreamRecord,
        ann: dict[str, Any],
        seg: Segment,
        targets: list[int],
        kinds: tuple[str, ...],
        h: int,
        w: int,
        parts: list[QuarantineRow],
    ) -> list[VisualPrompt]:
        given = (
            ann.get("visual_prompts")
            if isinstance(ann.get("visual_prompts"), dict)
            else {}
        )
        out = []
        problems = prompt_counts_problems([given.get(k) for k, kind in XSAM_KEYS.items() if kind in kinds], h, w)
        for key, kind in XSAM_KEYS.items():
            if kind not in kinds or given.get(key) is None:
                continue
            rle, reason, message = prompt_rle(given[key], h, w, problems)
            if rle is None:  # X-SAM skips empty prompts; we quarantine them as parts
                parts.append(self._part(upstream, f"{seg.id}:{kind}", reason, message))
                continue
            out.append(
                VisualPrompt(
                    kind=kind,
                    rle=rle,
                    geometry={"from_segment": seg.id},
                    segment_ids=list(targets),
                    phrase_index=seg.phrase_index,
                )
            )
        return out


CONVERTER_CLASSES = (CocoVgd,)
