"""Turn a planned item into a `Sample` (in a loader worker), and micro-batches into `PackedBatch`es
(`.to(device)` gives the model's dense `Batch`).

Per item (`XSamBuilder.build`):
1. parse the record from the shard's `KEY.json` and render its items again with the mixture's seed
   and the item's source pass as the epoch (`xsam.data.render`: new templates, category order and
   VGD negatives on every pass; evaluation items are fixed);
2. decode the image and make both encoder inputs as uint8 canvases (`xsam.data.transforms`;
   stage-1 jitter when configured, drawn from a rng seeded by (seed, item key, pass): a pure
   function of the item); normalisation happens in `PackedBatch.to(device)`;
3. decode the item's target masks, the record's `ignore` region and the visual prompts, and pack
   them with the same geometry (bits at the image's resolution; expanded on the device);
4. wrap the turns in the LLM's chat format and tokenise (`xsam.text.encode`): labels on answers
   only, `cond_ids`/`seg_ids`, and the length policy: a too-long item drops trailing turns (with
   their spans, `<SEG>`s and masks), counted in `Batch.truncated`; one whose first turn alone is
   too long is a bad item (`TextTooLong`), which the loader replaces and counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from xsam.data.batch import PackedBatch, Sample, collate
from xsam.data.loader import RawItem
from xsam.data.masks import counts_problems
from xsam.data.plan import derive_seed
from xsam.data.render import Category, RenderOptions, Templates, load_templates, render_record, vocabulary_from_table
from xsam.data.schema import Item, Record, ShardSample
from xsam.data.transforms import PreprocessConfig, decode_image, seg_window, vision_resized
from xsam.data.vprompts import rasterise_prompt
from xsam.text.chat import get_chat_format
from xsam.text.encode import Truncation, encode_item
from xsam.text.tokenizer import load_tokenizer
from xsam.text.tokens import special_ids

_REGION_TASKS = ("intseg", "vgdseg")


@dataclass(kw_only=True)
class XSamBuilder:
    """Builds X-SAM samples; picklable (the tokenizer and templates load lazily in each worker).

    Args:
        tokenizer: a local tokenizer folder (`xsam.text.tokenizer.build_tiny_tokenizer` for tests,
            the LLM's folder for real runs).
        chat_format: `phi3_chat`, `qwen3_instruct` or `qwen3_wothinking` (spec §1.2).
        max_length: text tokens per item, sentinels counted once (Phi-3: 4096 - 729 - 1024 = 2343).
        truncation: `drop_turns` (default) or `error` (a too-long item is a bad item).
        preprocess: image sizes, normalisation, stage-1 jitter.
        render: rendering options (paper branch by default). With `micro_batch_size` 1 there is no
            other sample to take VGD negative regions from, so they are not rendered.
        templates: a templates YAML replacing the packaged one.
        seed: the mixture's seed (renders and augmentations derive from it).
        micro_batch_size: the loader's, see `render`.
    """

    tokenizer: str | Path
    chat_format: str = "phi3_chat"
    max_length: int | None = 2343
    truncation: Truncation = "drop_turns"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    render: RenderOptions = field(default_factory=RenderOptions)
    templates: str | Path | None = None
    seed: int = 0
    micro_batch_size: int = 2
    _state: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_state"] = None  # the tokenizer is loaded again in each worker
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _loaded(self) -> dict[str, Any]:
        if self._state is None:
            tokenizer = load_tokenizer(self.tokenizer)
            options = self.render
            if self.micro_batch_size < 2 and options.vgd_negatives:
                options = RenderOptions(**{**options.__dict__, "vgd_negatives": False})
            self._state = {
                "tokenizer": tokenizer,
                "ids": special_ids(tokenizer),
                "chat": get_chat_format(self.chat_format),
                "templates": load_templates(self.templates),
                "options": options,
                "vocabularies": {},
            }
        return self._state

    @property
    def pad_id(self) -> int:
        return self._loaded()["ids"].pad

    def _vocabulary(self, raw: RawItem) -> list[Category] | None:
        cache = self._loaded()["vocabularies"]
        if raw.source.name not in cache:
            cache[raw.source.name] = vocabulary_from_table(raw.source.meta.get("categories") or []) or None
        return cache[raw.source.name]

    def build(self, raw: RawItem) -> Sample:
        st = self._loaded()
        record = ShardSample.model_validate_json(raw.sample_json()).record
        templates: Templates = st["templates"]
        items = render_record(
            record, seed=self.seed, epoch=raw.ref.pass_, templates=templates, options=st["options"],
            vocabulary=self._vocabulary(raw),
        )
        if raw.item_index >= len(items):
            raise ValueError(f"{raw.key}: the record renders {len(items)} items, not {raw.item_index + 1}")
        image = raw.member(record.image.ext) if record.image is not None else None
        return self.build_item(record, items[raw.item_index], image, source=raw.source.name, key=raw.key,
                               pass_=raw.ref.pass_)

    def build_item(
        self, record: Record, item: Item, image_bytes: bytes | None, *, source: str, key: str | None = None,
        pass_: int = 0,
    ) -> Sample:
        """The `Sample` of one rendered item of `record` whose image file holds `image_bytes`
        (None for a text-only record): `build` for shard items, `xsam predict` for a user's image."""
        st = self._loaded()
        key = key or item.key
        text = encode_item(item, st["tokenizer"], st["chat"], max_length=self.max_length, truncation=self.truncation)
        spans, segs = item.spans[: text.spans_kept], item.segs[: text.segs_kept]

        cfg = self.preprocess
        image_u8 = window = geometry = masks = ignore = regions = None
        mask_spans: list[int] = []
        mask_segs: list[int] = []
        region_slots: list[int] = []
        if record.image is not None:
            if image_bytes is None:
                raise ValueError(f"{source}:{key}: the record has an image but no image bytes were given")
            image = decode_image(image_bytes, name=f"{source}:{key}")
            rng = random.Random(derive_seed(self.seed, "augment", key, pass_)) if cfg.lsj else None
            image_u8 = vision_resized(image, cfg)
            window, geometry = seg_window(image, cfg, rng)
            h, w = image.shape[:2]
            rles: list = []
            for j, seg in enumerate(segs):
                for target in seg.targets:
                    rles.append(record.segments[target.segment].rle)
                    mask_spans.append(target.span)
                    mask_segs.append(j)
            masks = geometry.pack(_decode_all(rles, h, w))
            if record.ignore is not None:
                ignore = geometry.pack(_decode_all([record.ignore], h, w))
            own = []
            if record.task in _REGION_TASKS:
                own = [(k, span.prompt_index) for k, span in enumerate(spans) if span.prompt_index is not None]
            prompts = [rasterise_prompt(record.visual_prompts[p], h, w) for _, p in own]
            regions = geometry.pack(np.stack(prompts).astype(bool) if prompts else np.zeros((0, h, w), bool))
            region_slots = [k for k, _ in own]
        return Sample(
            key=key,
            source=source,
            task=record.task,
            input_ids=np.asarray(text.input_ids, dtype=np.int64),
            labels=np.asarray(text.labels, dtype=np.int64),
            cond_ids=np.asarray(text.cond_ids, dtype=np.int64),
            seg_ids=np.asarray(text.seg_ids, dtype=np.int64),
            image=image_u8,
            seg_window=window,
            geometry=geometry,
            masks=masks,
            mask_spans=np.asarray(mask_spans, dtype=np.int64),
            mask_segs=np.asarray(mask_segs, dtype=np.int64),
            ignore=ignore,
            regions=regions,
            region_slots=np.asarray(region_slots, dtype=np.int64),
            num_regions=text.region_count,
            truncated=text.truncated,
        )

    def prepare(self) -> None:
        """Load the tokenizer and templates now (the loader calls this before its workers fork,
        so they inherit them instead of each loading them again)."""
        self._loaded()

    def collate(self, samples: list[Sample]) -> PackedBatch:
        return collate(samples, pad_id=self.pad_id, preprocess=self.preprocess, seed=self.seed)


def _decode_all(rles: list, h: int, w: int) -> np.ndarray:
    """[N, H, W] bool from compressed RLEs (one pycocotools call)."""
    if not rles:
        return np.zeros((0, h, w), dtype=bool)
    coco = [{"size": list(r.size), "counts": r.counts.encode("ascii")} for r in rles]
    for rle, problem in zip(rles, counts_problems([c["counts"] for c in coco], h * w)):
        if problem is not None:  # pycocotools would fill the rest from uninitialised memory
            raise ValueError(f"mask RLE of size {list(rle.size)} for a {h} x {w} image: {problem}")
    out = mask_utils.decode(coco)  # [H, W, N] uint8, Fortran order
    if out.shape[:2] != (h, w):
        raise ValueError(f"mask size {out.shape[:2]} != image size {(h, w)}")
    return np.ascontiguousarray(out.transpose(2, 0, 1)).astype(bool)

