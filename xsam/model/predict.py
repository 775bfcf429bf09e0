"""Predict on one image: build the task's evaluation item from a prompt, run the model, post-process.

The input goes through exactly the path training and evaluation use: a `Record` of the task (the
image, the prompt as its phrase / category list / visual prompts), rendered in evaluation mode
(template 0, teacher-forced answer with its `<SEG>`, spec §1.3), tokenised, preprocessed and
collated by `XSamBuilder`, then `XSam.forward(compute_loss=False)` and the task's post-processing
(spec §6, `xsam.model.postprocess`). The record carries a placeholder full-image segment where the
renderer needs a target; targets are never used at inference.

Tasks and prompts:
- genseg / ovseg: `prompt` = comma-separated category names (open vocabulary); panoptic output.
- refseg / reaseg: `prompt` = the expression / question; one mask.
- intseg: one `--point` or `--box`; one mask.
- vgdseg: one or more `--point` / `--box`, each its own region (category); instance output per region.
- gcgseg: no prompt; the caption is generated first (greedy, spec §1.3: GCG evaluation generates),
  its well-formed `<p>…</p>` phrases become the conditions, and the generated text with its `<SEG>` is
  teacher-forced to pair each phrase with its best mask (`postprocess.grounded`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from xsam.data import masks as mask_codec
from xsam.data.batch import collate
from xsam.data.builder import XSamBuilder
from xsam.data.render import Category, RenderOptions, load_templates, render_record
from xsam.data.schema import (
    PHRASE_END, PHRASE_START, SEG_TOKEN, ChatTurn, Image, Item, Record, Segment, Source, VisualPrompt,
)
from xsam.model import postprocess
from xsam.model.export import LoadedModel

PREDICT_TASKS = ("genseg", "ovseg", "refseg", "reaseg", "intseg", "vgdseg", "gcgseg")
_PHRASE = re.compile(re.escape(PHRASE_START) + r"(.*?)" + re.escape(PHRASE_END), re.DOTALL)


@dataclass(kw_only=True)
class PredictedMask:
    label: str
    score: float
    mask: np.ndarray  # [H, W] bool

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 6), "area": int(self.mask.sum()),
                "rle": mask_codec.encode_json(self.mask)}


@dataclass(kw_only=True)
class Prediction:
    task: str
    prompt: str | None
    image_size: tuple[int, int]
    masks: list[PredictedMask] = field(default_factory=list)
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "prompt": self.prompt, "image_size": list(self.image_size), "text": self.text,
                "masks": [m.to_json() for m in self.masks]}


def _box_prompt(box: Sequence[float], width: int, height: int) -> VisualPrompt:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {list(box)} must be x0,y0,x1,y1 with 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}")
    return VisualPrompt(kind="box", geometry={"boxes": [[x0, y0, x1, y1]]}, seed=0, segment_ids=[0])


def _point_prompt(point: Sequence[float], width: int, height: int) -> VisualPrompt:
    x, y = (float(v) for v in point)
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point {list(point)} must be x,y inside the {width}x{height} image")
    return VisualPrompt(kind="point", geometry={"points": [[x, y]]}, seed=0, segment_ids=[0])


def prediction_record(
    task: str,
    image_bytes: bytes,
    *,
    prompt: str | None = None,
    points: Sequence[Sequence[float]] = (),
    boxes: Sequence[Sequence[float]] = (),
) -> tuple[Record, list[Category] | None, list[str]]:
    """The record that asks `task` about the image, the genseg vocabulary, and the display labels
    of its spans (category names, the expression, or "region 1", ...)."""
    if task not in PREDICT_TASKS:
        raise ValueError(f"task {task!r} cannot be predicted here; choose one of {', '.join(PREDICT_TASKS)}")
    with PILImage.open(io.BytesIO(image_bytes)) as im:
        width, height = im.size
        ext = "png" if im.format == "PNG" else "jpg"
    full = np.ones((height, width), dtype=bool)
    placeholder = Segment(id=0, rle=mask_codec.encode(full), bbox=(0.0, 0.0, float(width), float(height)),
                          area=float(width * height), category_id=1, category_name="object", isthing=True,
                          phrase_index=0)
    common: dict[str, Any] = {
        "key": "predict-eval-0", "task": task,
        "source": Source(corpus="predict", split="eval", upstream_ids={"image": 0}, annotation_file="-",
                         annotation_sha256="-"),
        "image": Image(ext=ext, sha256=hashlib.sha256(image_bytes).hexdigest(), bytes=len(image_bytes),
                       width=width, height=height, file_name="image"),
    }
    vocabulary = None
    if task in ("genseg", "ovseg"):
        names = [n.strip() for n in (prompt or "").split(",") if n.strip()]
        if not names:
            raise ValueError(f"{task} needs --prompt with comma-separated category names, e.g. 'person, horse, sky'")
        vocabulary = [Category(id=i + 1, name=n, isthing=True) for i, n in enumerate(names)]
        segment = placeholder.model_copy(update={"phrase_index": None})
        record = Record(**common, segments=[segment])
        return record, vocabulary, names
    if task == "gcgseg":
        # the caption is generated; the record only asks the question (template 0)
        record = Record(**common, captions=["."], meta={"phrase_char_spans": [], "phrase_segments": []})
        return record, None, []
    if task in ("refseg", "reaseg"):
        if not prompt:
            raise ValueError(f"{task} needs --prompt with the expression or question")
        record = Record(**common, segments=[placeholder], phrases=[prompt],
                        meta={"phrase_segments": [[0]], "is_sentence": task == "reaseg" and len(prompt.split()) > 6})
        return record, None, [prompt]
    prompts = [_point_prompt(p, width, height) for p in points] + [_box_prompt(b, width, height) for b in boxes]
    if not prompts:
        raise ValueError(f"{task} needs at least one --point x,y or --box x0,y0,x1,y1")
    if task == "intseg" and len(prompts) != 1:
        raise ValueError("intseg takes exactly one --point or --box (use vgdseg for several regions)")
    segments = [placeholder.model_copy(update={"id": i, "phrase_index": None}) for i in range(len(prompts))]
    prompts = [p.model_copy(update={"segment_ids": [i]}) for i, p in enumerate(prompts)]
    record = Record(**common, segments=segments, visual_prompts=prompts)
    return record, None, [f"region {i + 1}" for i in range(len(prompts))]


class Predictor:
    """Runs a loaded inference layout on single images (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, *, device: torch.device | str = "cpu") -> None:
        if loaded.model.decoder is None:
            raise ValueError(f"{loaded.path} is a {loaded.stage} model without a mask decoder: nothing to predict")
        if loaded.model.llm is None:
            raise ValueError(f"{loaded.path} is a {loaded.stage} model without an LLM; predict needs a stage-3 model")
        self.loaded = loaded
        self.device = torch.device(device)
        cfg = loaded.config
        self.builder = XSamBuilder(
            tokenizer=loaded.path / "tokenizer", chat_format=cfg.llm.chat_format, max_length=cfg.llm.max_length,
            truncation="error", preprocess=cfg.preprocess_config(), render=RenderOptions(mode="eval"),
            micro_batch_size=1,
        )
        self.templates = load_templates()

    def predict(
        self,
        image_bytes: bytes,
        task: str,
        *,
        prompt: str | None = None,
        points: Sequence[Sequence[float]] = (),
        boxes: Sequence[Sequence[float]] = (),
    ) -> Prediction:
        record, vocabulary, labels = prediction_record(task, image_bytes, prompt=prompt, points=points, boxes=boxes)
        items = render_record(record, seed=0, epoch=0, templates=self.templates,
                              options=RenderOptions(mode="eval"), vocabulary=vocabulary)
        item = items[0]
        text = ""
        if task == "gcgseg":
            text = self._generate_caption(record, item, image_bytes)
            item, labels = grounded_item(item, text)
            if not item.segs:  # nothing grounded: the caption is the whole answer
                with PILImage.open(io.BytesIO(image_bytes)) as im:
                    return Prediction(task=task, prompt=prompt, image_size=(im.size[1], im.size[0]), text=text)
        class_logits, mask_logits, geometry = self.forward_item(record, item, image_bytes)
        h, w = geometry.original_size
        post = self.loaded.config.postprocess
        result = Prediction(task=task, prompt=prompt, image_size=(h, w), text=text)
        if task == "gcgseg":
            for phrase, found in zip(labels, postprocess.grounded(class_logits, mask_logits, geometry.restore,
                                                                  num_phrases=len(labels),
                                                                  mask_threshold=post.mask_threshold)):
                result.masks.append(PredictedMask(label=phrase, score=found.score, mask=found.mask.cpu().numpy()))
            return result
        if task in ("genseg", "ovseg", "vgdseg"):
            found = postprocess.instance(class_logits, mask_logits, geometry.restore,
                                         threshold=post.display_threshold, mask_threshold=post.mask_threshold)
            for m, label, score in zip(found.masks, found.labels.tolist(), found.scores.tolist()):
                result.masks.append(PredictedMask(label=labels[label], score=score, mask=m.cpu().numpy()))
        else:
            found1 = postprocess.referring(class_logits, mask_logits, geometry.restore, condition=0,
                                           mask_threshold=post.mask_threshold)
            result.masks.append(PredictedMask(label=labels[0], score=found1.score, mask=found1.mask.cpu().numpy()))
        return result

    def forward_item(self, record: Record, item: Item, image_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The final decoder layer's (class_logits [Q, K+1], mask_logits [Q, h, w]) of the item's
        `<SEG>` and the image's `Geometry` (its `restore` maps masks back to the original size)."""
        sample = self.builder.build_item(record, item, image_bytes, source="predict")
        batch = collate([sample], pad_id=self.builder.pad_id, preprocess=self.builder.preprocess).to(self.device)
        # the region sampler draws its points from a seeded generator: the same input, the same output
        generator = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            out = self.loaded.model(batch, compute_loss=False, generator=generator)
        geometry = batch.geometries[0]
        assert geometry is not None and out.instances is not None and out.class_logits is not None
        return out.class_logits[0], out.mask_logits[0], geometry  # one <SEG>: one instance

    def answer(self, image_bytes: bytes, question: str, *, max_new_tokens: int = 128) -> str:
        """Greedy answer to a free-form question about the image (a chat item: the LLaVA-style path
        of stage 3's chat data); what a VLMEvalKit adapter calls for the chat benchmarks."""
        if not question.strip():
            raise ValueError("answer needs a question")
        record, _, _ = prediction_record("gcgseg", image_bytes)  # the image part; the task is replaced
        record = Record(**{**record.model_dump(exclude={"captions", "meta"}), "task": "chat",
                           "conversations": [ChatTurn(from_="human", value=question), ChatTurn(from_="gpt", value=".")]})
        item = render_record(record, seed=0, epoch=0, templates=self.templates, options=RenderOptions(mode="eval"))[0]
        return self._generate_caption(record, item, image_bytes, max_new_tokens)

    def generate_caption(self, record: Record, item: Item, image_bytes: bytes, max_new_tokens: int = 256) -> str:
        """Greedy answer to the item's first question (GCG evaluation generates its caption)."""
        return self._generate_caption(record, item, image_bytes, max_new_tokens)

    def _generate_caption(self, record: Record, item: Item, image_bytes: bytes, max_new_tokens: int = 256) -> str:
        """Greedy caption after the item's question (the answer is not part of the prompt)."""
        from xsam.text.encode import decode_for_display, encode_item

        st = self.builder._loaded()
        tokenizer, chat = st["tokenizer"], st["chat"]
        prompt = encode_item(item, tokenizer, chat, max_length=self.builder.max_length, include_last_answer=False)
        sample = self.builder.build_item(record, item, image_bytes, source="predict")
        n = len(prompt.input_ids)
        sample = dataclasses.replace(
            sample, input_ids=np.asarray(prompt.input_ids, dtype=np.int64), labels=np.full(n, -100, dtype=np.int64),
            cond_ids=np.full(n, -1, dtype=np.int64), seg_ids=np.full(n, -1, dtype=np.int64),
            masks=sample.masks.select([]) if sample.masks is not None else None,
            mask_spans=sample.mask_spans[:0], mask_segs=sample.mask_segs[:0],
        )
        batch = collate([sample], pad_id=self.builder.pad_id, preprocess=self.builder.preprocess).to(self.device)
        stop = [st["ids"].eos]
        suffix = tokenizer.convert_tokens_to_ids(chat.suffix) if chat.suffix_as_eos else None
        if isinstance(suffix, int) and suffix != tokenizer.unk_token_id:
            stop.append(suffix)
        new = self.loaded.model.generate(batch, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                         pad_token_id=st["ids"].pad)[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        return decode_for_display(new[:cut], tokenizer).strip()


def grounded_item(item: Item, text: str) -> tuple[Item, list[str]]:
    """`item` with the generated `text` as its answer, made well-formed: every complete `<p>…</p>` is
    a span (a stray `<p>` or `</p>` is dropped) and the first `<SEG>` is kept (GCG answers with one).
    Without a `<SEG>` or without a phrase nothing can be grounded: the item has no `<SEG>` then (as
    upstream, no masks). Returns the item and the phrase texts, in order."""
    phrases = [m.group(1).strip() for m in _PHRASE.finditer(text)]
    kept = _PHRASE.sub(lambda m: "\x00" + m.group(1) + "\x01", text)
    kept = kept.replace(PHRASE_START, "").replace(PHRASE_END, "").replace("\x00", PHRASE_START).replace("\x01", PHRASE_END)
    first = kept.find(SEG_TOKEN)
    if first >= 0:
        kept = kept[: first + len(SEG_TOKEN)] + kept[first + len(SEG_TOKEN):].replace(SEG_TOKEN, "")
    grounded = bool(phrases) and first >= 0
    if not grounded:
        kept = kept.replace(SEG_TOKEN, "")
    fields = item.model_dump()
    fields.update(
        turns=[fields["turns"][0], {"role": "assistant", "text": kept}],
        spans=[{"turn": 1} for _ in phrases],
        segs=[{"turn": 1}] if grounded else [],
    )
    return Item.model_validate(fields), phrases
