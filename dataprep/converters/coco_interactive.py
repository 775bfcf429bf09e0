"""COCO-Interactive (PSALM's `coco_interactive_{train,val}_psalm.json`) -> intseg records.

Upstream format (no real file was available; key names confirmed from code, not from a file):
X-SAM `xsam/xsam/dataset/img_intseg_dataset.py` reads a JSON list of
`{image, image_info{id, file_name, height, width}, anns[{id, category_id, bbox, iscrowd,
segmentation, point_visual_prompt_mask, scribble_visual_prompt_mask, box_visual_prompt_mask,
mask_visual_prompt_mask}]}` and decodes every mask with `decode_mask` (compressed/uncompressed RLE
or polygons); PSALM's (zamling/PSALM) COCO instance mapper and region evaluation use the same four
`*_visual_prompt_mask` keys and `pycocotools.mask.decode` them (RLE). X-SAM dilates point prompts with
discs of radius 10 and scribbles with radius 5 when loading; PSALM's evaluation dilates with a
10x10 square kernel instead.

Record layout (one record per image, key `coco-interactive-<split>-<image id>`, split from the file
name, e.g. `coco_interactive_val_psalm.json` -> `val`):
- segments: every annotation (crowd ones `iscrowd=True`, OR-ed into `ignore`, and given no prompt:
  the prompts PSALM's builder writes on crowd annotations become part-level `crowd_region` rows.
  X-SAM's intseg loader keeps them, so its evaluation holds one item per prompted crowd annotation
  more than ours; COCO marks about 1% of its instances crowd);
- visual_prompts: per non-crowd annotation (id order) and kind (point, scribble, box, mask) present
  upstream: `VisualPrompt(kind, rle=<upstream RLE, counts string unchanged>, segment_ids=[ann id])`,
  with `geometry={"dilate_radius": 10}` (point) / `{"dilate_radius": 5}` (scribble) telling
  `xsam.data.vprompts.rasterise_prompt` to apply X-SAM's load-time dilation. Polygon or
  uncompressed prompt masks are normalised to compressed RLE. Empty/unreadable prompt masks are
  quarantined as parts (`<ann id>:<kind>`).
- phrases: category names when `--instances` (a COCO instances file) gives the category table (the
  PSALM file has none); `phrase_index` of segments and prompts = their category.
- `--flavor point|scribble|box|mask` keeps one prompt kind: upstream evaluates one prompt type per
  split, so convert once per flavor to get the four evaluation datasets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Plan,
    UpstreamRecord,
    load_json_input,
)
from dataprep.converters.coco_vgd import CocoVgd, flavor_kinds, prompt_counts_problems, prompt_rle
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from xsam.data import masks, vprompts
from xsam.data.schema import Record, VisualPrompt

FIX_INTERACTIVE = "pass PSALM's COCO-Interactive JSON, e.g. coco_int/annotations/coco_interactive_val_psalm.json"
PROMPT_KEYS = {f"{k}_visual_prompt_mask": k for k in vprompts.KINDS}
DILATE = {"point": vprompts.POINT_RADIUS, "scribble": vprompts.SCRIBBLE_RADIUS}


class CocoInteractive(CocoVgd):
    name = "coco-interactive"
    task = "intseg"
    version = "2"  # 2: prompts on crowd annotations are quarantined as crowd_region
    required_inputs = {
        "images": "folder or .zip/.tar of the COCO images (val2017/ for the val file, train2017/ for train)",
        "annotations": "PSALM's COCO-Interactive JSON (coco_interactive_{train,val}_psalm.json)",
    }
    optional_inputs = {
        "split": "split name for the record keys (default: from the file name, e.g. val)",
        "flavor": "keep one prompt kind only: point | scribble | box | mask (one evaluation dataset per kind)",
        "instances": "COCO instances JSON whose `categories` give the category names",
    }
    example = (
        "xsam data convert coco-interactive --out data/coco-interactive "
        "--annotations coco_int/annotations/coco_interactive_val_psalm.json --images val2017"
    )
    fix = FIX_INTERACTIVE

    def _split(self) -> str:
        if self.inputs.get("split"):
            return str(self.inputs["split"])
        match = re.search(
            r"(train|val|test)", Path(str(self.inputs.get("annotations", ""))).name
        )
        return match.group(1) if match else "default"

    def parameters(self) -> dict[str, Any]:
        return {"split": self._split(), "flavor": self.inputs.get("flavor") or "all"}

    def plan(self) -> Plan:
        flavor_kinds(self.inputs.get("flavor"), self.name)
        path = self.inputs["annotations"]
        data, self._source = load_json_input(path, "annotations", self.fix)
        if not isinstance(data, list):
            raise InputError(
                f"--annotations: {path} must be a JSON list of image records; {self.fix}"
            )
        return self._plan_image_list(data, anns_key="anns", fmt="psalm", empty_is_missing=True)

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        img = upstream.payload["image"]
        data, image = self._read_record_image(upstream, options)
        h, w = image.height, image.width
        kinds = flavor_kinds(self.inputs.get("flavor"), self.name)
        parts: list[QuarantineRow] = []
        segments, crowd, names = self._annotation_segments(upstream, h, w, parts, options)
        raw = {
            a.get("id"): a
            for a in upstream.payload["annotations"]
            if isinstance(a, dict)
        }
        prompts: list[VisualPrompt] = []
        problems = prompt_counts_problems(  # the prompts used below, checked in one pass
            [raw[seg.id].get(key) for seg in segments if not seg.iscrowd
             for key, kind in PROMPT_KEYS.items() if kind in kinds], h, w
        )
        for seg in segments:
            ann = raw[seg.id]
            if seg.iscrowd:  # its region is ignored by losses and metrics: not a target to prompt for
                parts.extend(
                    self._part(upstream, f"{seg.id}:{kind}", "crowd_region",
                               f"{kind} prompt on crowd annotation {seg.id}: crowd regions are the record's "
                               "ignore mask, never a target")
                    for key, kind in PROMPT_KEYS.items()
                    if kind in kinds and ann.get(key) is not None
                )
                continue
            for key, kind in PROMPT_KEYS.items():
                if kind not in kinds or ann.get(key) is None:
                    continue
                rle, reason, message = prompt_rle(ann[key], h, w, problems)
                if rle is None:
                    parts.append(
                        self._part(upstream, f"{seg.id}:{kind}", reason, message)
                    )
                    continue
                prompts.append(
                    VisualPrompt(
                        kind=kind,
                        rle=rle,
                        geometry={"dilate_radius": DILATE[kind]}
                        if kind in DILATE
                        else None,
                        segment_ids=[seg.id],
                        phrase_index=seg.phrase_index,
                    )
                )
        if not prompts:
            raise RecordRejected(
                "missing_annotation",
                f"image {img['file_name']}: no annotation with a usable {'/'.join(kinds)} prompt",
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
        )
        return Converted(record=record, image_bytes=data, parts=parts)


CONVERTER_CLASSES = (CocoInteractive,)
