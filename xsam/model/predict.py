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
GCG needs the caption generated first and is not offered here yet.
"""

from __future__ import annotations

import hashlib
import io
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
from xsam.data.schema import Image, Record, Segment, Source, VisualPrompt
from xsam.model import postprocess
from xsam.model.export import LoadedModel

PREDICT_TASKS = ("genseg", "ovseg", "refseg", "reaseg", "intseg", "vgdseg")


@dataclass(kw_only=True)
class PredictedMask:
    label: str
    score: float
    mask: np.ndarray  # [H, W] bool

    def to_json(self) -> dict[str, Any]:
        rle = mask_codec.encode(self.mask)
        return {"label": self.label, "score": round(self.score, 6), "area": int(self.mask.sum()),
                "rle": {"size": list(rle.size), "counts": rle.counts}}


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
        sample = self.builder.build_item(record, items[0], image_bytes, source="predict")
        batch = collate([sample], pad_id=self.builder.pad_id, preprocess=self.builder.preprocess).to(self.device)
        model = self.loaded.model
        # the region sampler draws its points from a seeded generator: the same input, the same output
        generator = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            out = model(batch, compute_loss=False, generator=generator)
        geometry = batch.geometries[0]
        assert geometry is not None and out.instances is not None and out.class_logits is not None
        h, w = geometry.original_size
        post = self.loaded.config.postprocess
        result = Prediction(task=task, prompt=prompt, image_size=(h, w))
        class_logits, mask_logits = out.class_logits[0], out.mask_logits[0]  # one <SEG>: one instance
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
