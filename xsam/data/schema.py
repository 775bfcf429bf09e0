"""The sample contract of xsam-pipeline: records (what shards store) and items (what models see).

A *record* is one upstream unit for one task: an image with all its annotations for that task
(e.g. a COCO panoptic image with every segment, a RefCOCO image with every referred object).
An *item* is one training or evaluation sample rendered from a record by `xsam.data.render`
(e.g. a RefCOCO record yields one multi-turn training item and one evaluation item per sentence).

Keys:
- record keys are stable: corpus + split + upstream id, never processing order, and use only
  `[a-z0-9_-]` because WebDataset cuts sample keys at the first dot;
- item keys are `RECORDKEY#i`.

Masks are COCO compressed RLE (`{"size": [h, w], "counts": str}`), lossless. Image bytes are the
original encoded upstream bytes, stored next to the record JSON in the shard (`KEY.jpg|png`), never
re-encoded; the record keeps their sha256 and size.

Bump `SCHEMA_VERSION` on any change a reader must know about: the major part on breaking changes.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "1.1.0"  # 1.1: `image` may be None for text-only chat records

Task = Literal["chat", "genseg", "ovseg", "refseg", "reaseg", "gcgseg", "intseg", "vgdseg"]
TASKS: tuple[str, ...] = ("chat", "genseg", "ovseg", "refseg", "reaseg", "gcgseg", "intseg", "vgdseg")

KEY_PATTERN = re.compile(r"^[a-z0-9_-]+$")
ITEM_KEY_PATTERN = re.compile(r"^([a-z0-9_-]+)#([0-9]+)$")

# Special strings of X-SAM (spec section 1.1). `<image>` and `<region>` become sentinel ids in
# the loader; `<SEG>`, `<p>`, `</p>` are added to the LLM vocabulary.
IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
SEG_TOKEN = "<SEG>"
PHRASE_START = "<p>"
PHRASE_END = "</p>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class RLE(_Strict):
    """COCO compressed run-length encoding of one binary mask (pycocotools' string counts)."""

    size: tuple[int, int] = Field(description="[height, width] of the mask, equal to the image's")
    counts: str = Field(description="compressed RLE counts string (pycocotools `encode`)")


class Source(_Strict):
    """Where a record came from, precisely enough to find it upstream again."""

    corpus: str = Field(description="converter name, e.g. `coco-panoptic`")
    split: str = Field(description="upstream split name, e.g. `val2017`, `testA`")
    upstream_ids: dict[str, int | str] = Field(
        description="upstream identifiers of the unit, e.g. {'image_id': 439180}"
    )
    annotation_file: str = Field(description="base name of the upstream annotation file")
    annotation_sha256: str = Field(description="sha256 of that annotation file")


class Image(_Strict):
    """The record's image. Its bytes are the shard member `KEY.<ext>`, as upstream encoded them."""

    ext: Literal["jpg", "png"] = Field(description="shard member extension, from the bytes' format")
    sha256: str
    bytes: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    file_name: str = Field(description="upstream file name (relative to the images input)")


class Segment(_Strict):
    """One mask with its label. Which phrase names it is `phrase_index` (into `Record.phrases`)."""

    id: int = Field(description="upstream segment/annotation id (stable within the record)")
    rle: RLE
    category_id: int | None = Field(default=None, description="upstream category id")
    category_name: str | None = Field(default=None, description="upstream category name, raw")
    isthing: bool | None = Field(default=None, description="thing (countable) vs stuff")
    iscrowd: bool = False
    bbox: tuple[float, float, float, float] = Field(description="[x, y, w, h]; upstream value when given")
    area: float = Field(ge=0, description="upstream area when given (COCO polygon area), else pixel count")
    phrase_index: int | None = Field(default=None, ge=0)


class VisualPrompt(_Strict):
    """A region prompt (`<region>`) for intseg/vgdseg: an upstream mask, or geometry we generated."""

    kind: Literal["point", "scribble", "box", "mask"]
    rle: RLE | None = Field(default=None, description="upstream prompt mask; None when generated")
    geometry: dict[str, Any] | None = Field(
        default=None, description="generated prompt geometry (points, box) in image pixels"
    )
    seed: int | None = Field(default=None, description="seed of a generated prompt")
    segment_ids: list[int] = Field(default_factory=list, description="ids of the segments it points at")
    phrase_index: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _has_shape(self) -> VisualPrompt:
        if self.rle is None and self.geometry is None:
            raise ValueError("a visual prompt needs an upstream `rle` or generated `geometry`")
        if self.geometry is not None and self.rle is None and self.seed is None:
            raise ValueError("a generated visual prompt (geometry only) must record its `seed`")
        return self


class ChatTurn(_Strict):
    """One upstream conversation turn, LLaVA style (`from` is `human` or `gpt`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Record(_Strict):
    """What one shard sample stores: one upstream unit for one task."""

    schema_version: str = SCHEMA_VERSION
    key: str = Field(description="stable key: corpus + split + upstream id, `[a-z0-9_-]` only")
    task: Task
    source: Source
    image: Image | None = Field(
        description="the image; None only for a text-only chat record (LLaVA, --keep-text-only)"
    )
    segments: list[Segment] = Field(default_factory=list)
    ignore: RLE | None = Field(
        default=None, description="pixels that losses and metrics ignore (void, crowd, ADE 0/255)"
    )
    phrases: list[str] = Field(
        default_factory=list,
        description="texts that `<p>...</p>` spans hold: category names, expressions, caption spans",
    )
    visual_prompts: list[VisualPrompt] = Field(default_factory=list)
    captions: list[str] = Field(default_factory=list)
    conversations: list[ChatTurn] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("key")
    @classmethod
    def _key_chars(cls, key: str) -> str:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"record key {key!r} must match [a-z0-9_-]+ (WebDataset cuts keys at '.')")
        return key

    @model_validator(mode="after")
    def _consistent(self) -> Record:
        if self.image is None:
            if self.task != "chat" or self.segments or self.ignore is not None or self.visual_prompts:
                raise ValueError("only a chat record without masks or prompts may have no image")
            return self
        hw = (self.image.height, self.image.width)
        for seg in self.segments:
            if tuple(seg.rle.size) != hw:
                raise ValueError(f"segment {seg.id}: mask size {list(seg.rle.size)} != image [h, w] {list(hw)}")
            if seg.phrase_index is not None and seg.phrase_index >= len(self.phrases):
                raise ValueError(f"segment {seg.id}: phrase_index {seg.phrase_index} out of range")
        if self.ignore is not None and tuple(self.ignore.size) != hw:
            raise ValueError(f"ignore mask size {list(self.ignore.size)} != image [h, w] {list(hw)}")
        for i, vp in enumerate(self.visual_prompts):
            if vp.rle is not None and tuple(vp.rle.size) != hw:
                raise ValueError(f"visual prompt {i}: mask size != image size")
        ids = [s.id for s in self.segments]
        if len(set(ids)) != len(ids):
            raise ValueError("segment ids must be unique within a record")
        return self


class Turn(_Strict):
    """One rendered conversation turn. Text holds the special strings; no LLM chat markers."""

    role: Literal["user", "assistant"]
    text: str


class Span(_Strict):
    """The k-th `<p>...</p>` span of an item, in reading order over all turns."""

    turn: int = Field(ge=0)
    phrase_index: int | None = Field(default=None, ge=0, description="into Record.phrases")
    prompt_index: int | None = Field(default=None, ge=0, description="into Record.visual_prompts")
    category_id: int | None = Field(
        default=None, description="genseg/ovseg: the vocabulary category this span names"
    )


class SegTarget(_Strict):
    """One mask a `<SEG>` must produce: a record segment, classified as one of the item's spans."""

    segment: int = Field(ge=0, description="index into Record.segments")
    span: int = Field(ge=0, description="index into Item.spans: the mask's class")


class SegAnswer(_Strict):
    """The j-th `<SEG>` of the item (one per answer turn) and the masks it answers (may be empty)."""

    turn: int = Field(ge=0)
    targets: list[SegTarget] = Field(default_factory=list)


class Item(_Strict):
    """One training or evaluation sample rendered from a record (see `xsam.data.render`)."""

    key: str = Field(description="`RECORDKEY#i`")
    record_key: str
    task: Task
    mode: Literal["train", "eval"]
    seed: int
    epoch: int = Field(ge=0)
    index: int = Field(ge=0, description="item index within the record")
    turns: list[Turn]
    spans: list[Span] = Field(default_factory=list)
    segs: list[SegAnswer] = Field(default_factory=list)
    template_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Item:
        match = ITEM_KEY_PATTERN.match(self.key)
        if not match or match.group(1) != self.record_key or int(match.group(2)) != self.index:
            raise ValueError(f"item key {self.key!r} must be '{self.record_key}#{self.index}'")
        for seg in self.segs:
            if seg.turn >= len(self.turns) or self.turns[seg.turn].role != "assistant":
                raise ValueError(f"<SEG> answer points at turn {seg.turn}, which is not an answer turn")
            for target in seg.targets:
                if target.span >= len(self.spans):
                    raise ValueError(f"<SEG> target span {target.span} out of range")
        n_seg = sum(t.text.count(SEG_TOKEN) for t in self.turns)
        if n_seg != len(self.segs):
            raise ValueError(f"item has {n_seg} {SEG_TOKEN} in its text but {len(self.segs)} answers")
        n_span = sum(t.text.count(PHRASE_START) for t in self.turns)
        if n_span != len(self.spans):
            raise ValueError(f"item has {n_span} {PHRASE_START} spans in its text but {len(self.spans)} spans")
        return self


class ShardSample(_Strict):
    """The `KEY.json` member of a shard: the record plus its default rendering (seed 0, epoch 0)."""

    record: Record
    items: list[Item]

    @model_validator(mode="after")
    def _items_fit_record(self) -> ShardSample:
        rec = self.record
        for i, item in enumerate(self.items):
            where = f"item {item.key}"
            if item.record_key != rec.key or item.task != rec.task or item.index != i:
                raise ValueError(f"{where}: must be item {i} of record {rec.key} ({rec.task})")
            for span in item.spans:
                if span.phrase_index is not None and span.phrase_index >= len(rec.phrases):
                    raise ValueError(f"{where}: span phrase_index {span.phrase_index} out of range")
                if span.prompt_index is not None and span.prompt_index >= len(rec.visual_prompts):
                    raise ValueError(f"{where}: span prompt_index {span.prompt_index} out of range")
            for seg in item.segs:
                for target in seg.targets:
                    if target.segment >= len(rec.segments):
                        raise ValueError(f"{where}: <SEG> target segment {target.segment} out of range")
        return self


M = TypeVar("M", bound=BaseModel)
_new = object.__new__
_setattr = object.__setattr__


def checked_model(cls: type[M], values: dict[str, Any]) -> M:
    """`cls(**values)` without pydantic's validation pass, for hot paths that have checked the values.

    Only for a `_Strict` model without private attributes whose validation would store `values`
    unchanged: EVERY field given, in the model's field order (the order pydantic serialises the
    fields in), each value already of the exact type the field stores (an `int` field gets an `int`,
    never a `bool`; a nested model gets an instance) and within the field's constraints. The
    instance is then identical to the validated one: same `__dict__` (same keys in the same order,
    same objects), all fields counted as set, no extra and no private values (tested in
    tests/dataprep/test_fast_paths.py). Like `model_construct`, which is slower than validating.
    """
    model = _new(cls)
    _setattr(model, "__dict__", values)
    _setattr(model, "__pydantic_fields_set__", set(values))
    _setattr(model, "__pydantic_extra__", None)
    _setattr(model, "__pydantic_private__", None)
    return model


def item_key(record_key: str, index: int) -> str:
    return f"{record_key}#{index}"


def make_key(*parts: str | int) -> str:
    """Build a record key from corpus, split and upstream id parts: lowercase, `[a-z0-9_-]` only.

    Integers are zero-padded to 12 digits (COCO's file-name width) so keys sort numerically.
    Any other character becomes `_`; e.g. ("coco-panoptic", "val2017", 439180) ->
    "coco-panoptic-val2017-000000439180".
    """
    out = []
    for part in parts:
        text = f"{part:012d}" if isinstance(part, int) else str(part).lower()
        out.append(re.sub(r"[^a-z0-9_-]", "_", text))
    key = "-".join(out)
    if not KEY_PATTERN.match(key):
        raise ValueError(f"cannot build a record key from {parts!r}")
    return key


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the contract, as committed under `docs/schema/`."""
    return {
        "record": Record.model_json_schema(by_alias=True),
        "item": Item.model_json_schema(by_alias=True),
        "shard_sample": ShardSample.model_json_schema(by_alias=True),
    }
