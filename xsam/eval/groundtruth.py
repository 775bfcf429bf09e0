"""Ground truth for scoring, read out of a dataset folder's records (the shards are the one truth).

A benchmark is (dataset folder, split, task, ground-truth view). The view says which shape of the
stored annotation a metric needs (spec §5):

- `panoptic`: every segment painted with its own id (crowd segments flagged), void where no segment
  lies or the record's `ignore` says so (crowd excepted: panopticapi handles crowd itself);
- `semantic`: a label map over the dataset's category table (`xsam.data.views.semantic_map`). COCO's
  semantic ground truth (`panoptic_semseg_val2017`, derived by Mask2Former from the panoptic PNGs)
  keeps crowd pixels in their class, so for `coco-panoptic` the record's `ignore` is not applied
  (`semantic_ignore: auto`); other corpora (ADE20K's 0 / 255) apply it;
- `instance`: thing segments as COCO annotations, crowd kept with `iscrowd` so COCOeval ignores them
  (`xsam.data.views.instance_view`; `thing_category_ids` restricts the classes, e.g. ADE20K's 100);
- referring tasks (refseg, grefseg, reaseg, intseg): one sample per evaluation item (`RECORDKEY#i`,
  rendered with the fixed evaluation seed, template 0): the union of the item's target segments
  (empty for a gRefCOCO no-target expression) and the record's `ignore`. A record stores every
  prompt kind of an instance (point, scribble, box, mask) and its evaluation item uses the first;
  `prompt_kind` keeps only that kind's prompts before rendering, so one converted COCO-Interactive
  (or COCO-VGD) folder serves the four per-prompt-type benchmarks X-SAM reports;
- `vgdseg`: every segment a visual prompt points at, as COCO annotations of its category;
- `gcgseg`: the caption, its phrases and each phrase's mask (union of its segments).

Image ids. Prediction files name images by their upstream id (`source.upstream_ids["image_id"]`:
COCO's integer id, ADE20K's file stem, GranD-f's id string); `image_key` normalises them so 439180,
"439180" and "000000439180" name the same image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xsam.data import masks as mask_codec
from xsam.data.manifest import load_dataset
from xsam.data.render import RenderOptions, load_templates, render_record, vocabulary_from_table
from xsam.data.schema import Item, Record
from xsam.data.shards import dataset_splits, read_records
from xsam.data.storage import open_storage
from xsam.data.views import instance_view, semantic_map

SCORE_TASKS = (
    "genseg-panoptic", "genseg-semantic", "genseg-instance",
    "ovseg-panoptic", "ovseg-semantic", "ovseg-instance",
    "refseg", "grefseg", "reaseg", "gcgseg", "intseg", "vgdseg",
)
# the record task each scoring task reads
RECORD_TASK = {
    "genseg-panoptic": "genseg", "genseg-semantic": "genseg", "genseg-instance": "genseg",
    "ovseg-panoptic": "ovseg", "ovseg-semantic": "ovseg", "ovseg-instance": "ovseg",
    "refseg": "refseg", "grefseg": "refseg", "reaseg": "reaseg", "gcgseg": "gcgseg",
    "intseg": "intseg", "vgdseg": "vgdseg",
}
REFERRING_TASKS = ("refseg", "grefseg", "reaseg", "intseg")
PROMPT_KINDS = ("point", "scribble", "box", "mask")
EVAL_SEED = 0  # the fixed evaluation seed: template 0 and no random choice (xsam.data.render)


class GroundTruthError(ValueError):
    """The dataset cannot serve as ground truth for the task (wrong task, unknown split, ...)."""


def image_key(value: Any) -> str:
    """A prediction's or record's image id, normalised: digit strings lose leading zeros."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def upstream_image_id(record: Record) -> Any:
    """The record's upstream image id as the corpus gives it (what prediction files carry)."""
    ids = record.source.upstream_ids
    for name in ("image_id", "image", "id"):
        if name in ids:
            return ids[name]
    return record.key


def record_image_key(record: Record) -> str:
    return image_key(upstream_image_id(record))


@dataclass(kw_only=True, slots=True)
class View:
    """How a benchmark reads its ground truth (the `ground_truth` block of configs/benchmarks.yaml)."""

    semantic_ignore: Literal["auto", "apply", "keep-crowd"] = "auto"
    thing_category_ids: list[int] | None = None
    prompt_kind: Literal["point", "scribble", "box", "mask"] | None = None

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, where: str) -> View:
        data = dict(data or {})
        known = {"semantic_ignore", "thing_category_ids", "prompt_kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GroundTruthError(f"{where}: unknown ground_truth key(s) {', '.join(unknown)}"
                                   f" (known: {', '.join(sorted(known))})")
        view = cls(**data)
        if view.semantic_ignore not in ("auto", "apply", "keep-crowd"):
            raise GroundTruthError(f"{where}: semantic_ignore must be auto, apply or keep-crowd,"
                                   f" got {view.semantic_ignore!r}")
        if view.prompt_kind not in (None, *PROMPT_KINDS):
            raise GroundTruthError(f"{where}: prompt_kind must be one of {', '.join(PROMPT_KINDS)},"
                                   f" got {view.prompt_kind!r}")
        return view


@dataclass(kw_only=True, slots=True)
class ReferringSample:
    """One referring-style evaluation sample: an item and what it must segment."""

    key: str  # item key RECORDKEY#i
    record: Record
    item: Item
    targets: list[int]  # indices into record.segments
    group: str | None  # intseg: prompt kind; reaseg: short / long
    aliases: tuple[str, ...] = ()  # other names predictions may use (image_id + sent_id)

    def gt_mask(self) -> np.ndarray:
        h, w = self.record.image.height, self.record.image.width
        out = np.zeros((h, w), dtype=bool)
        for s in self.targets:
            out |= mask_codec.decode(self.record.segments[s].rle)
        return out

    def ignore(self) -> np.ndarray | None:
        return mask_codec.decode(self.record.ignore) if self.record.ignore is not None else None


@dataclass(kw_only=True, slots=True)
class GroundTruth:
    """A task's ground truth over one split of one dataset folder."""

    task: str
    dataset: str
    split: str
    version: str  # the dataset's version id (sha256 of its manifest)
    corpus: str
    categories: list[dict[str, Any]]
    records: list[Record]
    shards: list[str]  # the shard of each record (evaluation workers read records by shard and key)
    view: View = field(default_factory=View)

    @property
    def images(self) -> dict[str, Record]:
        return {record_image_key(r): r for r in self.records}

    # ------------------------------------------------------------------ per-view ground truth

    def panoptic(self, record: Record) -> tuple[np.ndarray, list[tuple[int, int, bool]]]:
        """(id map with 0 = void, [(id, category_id, iscrowd)]) of one record."""
        h, w = record.image.height, record.image.width
        ids = np.zeros((h, w), dtype=np.int32)
        crowd = np.zeros((h, w), dtype=bool)
        segments = []
        for i, seg in enumerate(record.segments):
            if seg.category_id is None:
                raise GroundTruthError(f"record {record.key}: segment {seg.id} has no category_id")
            m = mask_codec.decode(seg.rle)
            ids[m] = i + 1
            if seg.iscrowd:
                crowd |= m
            segments.append((i + 1, seg.category_id, bool(seg.iscrowd)))
        if record.ignore is not None:
            ids[mask_codec.decode(record.ignore) & ~crowd] = 0
        present = set(np.unique(ids).tolist())
        return ids, [s for s in segments if s[0] in present]

    def semantic(self, record: Record) -> np.ndarray:
        apply = self.view.semantic_ignore == "apply" or (
            self.view.semantic_ignore == "auto" and self.corpus != "coco-panoptic")
        return semantic_map(record, [c["id"] for c in self.categories], 255, apply_ignore=apply)

    def instance_categories(self) -> list[dict[str, Any]]:
        ids = self.view.thing_category_ids
        if ids is not None:
            return [c for c in self.categories if c["id"] in set(ids)]
        return [c for c in self.categories if c.get("isthing", True)]

    def coco_images(self) -> list[dict[str, Any]]:
        return [{"id": i + 1, "width": r.image.width, "height": r.image.height} for i, r in enumerate(self.records)]

    def coco_annotations(self) -> list[dict[str, Any]]:
        """Instance (genseg/ovseg) or prompted (vgdseg) segments as COCO annotations; image ids are
        positions + 1 in `records` (`coco_image_ids` maps upstream ids onto them)."""
        out: list[dict[str, Any]] = []
        things = self.view.thing_category_ids
        for i, record in enumerate(self.records):
            if self.task == "vgdseg":
                prompted = {sid for vp in record.visual_prompts for sid in vp.segment_ids}
                segments = [s for s in record.segments if s.id in prompted]
            else:
                segments = instance_view(record, set(things) if things is not None else None)
            for seg in segments:
                coco = mask_codec.to_coco(seg.rle)
                out.append({
                    "id": len(out) + 1, "image_id": i + 1, "category_id": seg.category_id,
                    "segmentation": {"size": coco["size"], "counts": coco["counts"].decode("ascii")},
                    "area": float(mask_codec.area(seg.rle)), "bbox": list(mask_codec.bbox(seg.rle)),
                    "iscrowd": int(seg.iscrowd),
                })
        return out

    def coco_image_ids(self) -> dict[str, int]:
        return {record_image_key(r): i + 1 for i, r in enumerate(self.records)}

    def evaluation_items(self, record: Record) -> tuple[Record, list[Item]]:
        return evaluation_items(self.task, record, view=self.view, categories=self.categories)

    def referring_samples(self) -> Iterator[ReferringSample]:
        """The evaluation items of a referring-style task, in record order."""
        for record in self.records:
            record, items = self.evaluation_items(record)
            sent_ids = record.meta.get("sent_ids") if isinstance(record.meta.get("sent_ids"), list) else None
            is_sentence = record.meta.get("is_sentence", False)
            for item in items:
                targets = sorted({t.segment for seg in item.segs for t in seg.targets})
                span = item.spans[0] if item.spans else None
                group, aliases = None, ()
                if self.task == "intseg" and span is not None and span.prompt_index is not None:
                    group = record.visual_prompts[span.prompt_index].kind
                if self.task == "reaseg" and span is not None and span.phrase_index is not None:
                    long = is_sentence[span.phrase_index] if isinstance(is_sentence, list) else bool(is_sentence)
                    group = "long" if long else "short"
                if sent_ids is not None and span is not None and span.phrase_index is not None:
                    aliases = (f"{record_image_key(record)}/{sent_ids[span.phrase_index]}",)
                yield ReferringSample(key=item.key, record=record, item=item, targets=targets,
                                      group=group, aliases=aliases)

    def prompted(self, record: Record) -> Record:
        return prompted(record, self.view.prompt_kind)

    def gcg_samples(self) -> Iterator[tuple[Record, list[str], list[np.ndarray]]]:
        """(record, phrases, one mask per phrase) of every GCG record."""
        for record in self.records:
            if not record.captions:
                raise GroundTruthError(f"record {record.key} has no caption: not GCG ground truth")
            per_phrase = record.meta.get("phrase_segments") or [[i] for i in range(len(record.phrases))]
            h, w = record.image.height, record.image.width
            phrase_masks = []
            for segs in per_phrase:
                m = np.zeros((h, w), dtype=bool)
                for s in segs:
                    m |= mask_codec.decode(record.segments[s].rle)
                phrase_masks.append(m)
            yield record, list(record.phrases), phrase_masks


def prompted(record: Record, kind: str | None) -> Record:
    """`record` with only its visual prompts of `kind` (all of them when `kind` is None)."""
    if kind is None or not record.visual_prompts:
        return record
    kept = [vp for vp in record.visual_prompts if vp.kind == kind]
    if not kept:
        raise GroundTruthError(f"record {record.key} has no {kind} prompt (it has"
                               f" {', '.join(sorted({vp.kind for vp in record.visual_prompts}))})")
    return record.model_copy(update={"visual_prompts": kept})


def evaluation_items(task: str, record: Record, *, view: View, categories: list[dict[str, Any]]
                     ) -> tuple[Record, list[Item]]:
    """The record as the view sees it (`prompted`) and its evaluation items for scoring task `task`: the
    fixed evaluation seed, template 0, the dataset's whole vocabulary for genseg / ovseg (in id order)."""
    record = prompted(record, view.prompt_kind)
    vocabulary = vocabulary_from_table(categories) if RECORD_TASK[task] in ("genseg", "ovseg") else None
    items = render_record(record, seed=EVAL_SEED, epoch=0, templates=load_templates(),
                          options=RenderOptions(mode="eval"), vocabulary=vocabulary)
    return record, items


def choose_split(dataset: str | Path, split: str | None) -> str:
    """`split`, or the dataset's only evaluation split (a split not starting with "train")."""
    splits = dataset_splits(dataset)
    if split is not None:
        if split not in splits:
            raise GroundTruthError(f"{dataset} has no split {split!r}; it holds {', '.join(splits)} (pick one with --split)")
        return split
    held_out = [s for s in splits if not s.lower().startswith("train")] or splits
    if len(held_out) != 1:
        raise GroundTruthError(f"{dataset} holds the splits {', '.join(splits)}: name the one to score with --split")
    return held_out[0]


def load_ground_truth(task: str, dataset: str | Path, *, split: str | None = None, view: View | None = None) -> GroundTruth:
    """Read the records of `split` of the dataset folder (local or s3://) for `task`."""
    if task not in SCORE_TASKS:
        raise GroundTruthError(f"unknown task {task!r}; choose one of {', '.join(SCORE_TASKS)}")
    storage = open_storage(dataset)
    files = load_dataset(storage)
    meta = files.meta
    chosen = choose_split(dataset, split)
    want = RECORD_TASK[task]
    held = sorted(meta.get("by_task", {}))
    compatible = {want} | ({"genseg", "ovseg"} if want in ("genseg", "ovseg") else set())
    if not compatible & set(held):
        raise GroundTruthError(
            f"{dataset} holds {', '.join(held) or 'no'} records; task {task} needs {want} records"
            f" (convert the benchmark's corpus into its own folder)")
    stored = [s for s in read_records(dataset, splits=[chosen]) if s.record.task in compatible]
    records = [s.record for s in stored]
    if not records:
        raise GroundTruthError(f"{dataset} has no {want} records in split {chosen}")
    return GroundTruth(task=task, dataset=str(dataset), split=chosen, version=files.version,
                       corpus=str(meta.get("corpus", "")), categories=list(meta.get("categories") or []),
                       records=records, shards=[s.shard for s in stored], view=view or View())

