"""Run a loaded model on one evaluation unit and return its predictions in the scoring formats.

A unit is one record (genseg / ovseg / vgdseg / gcgseg: the record's one evaluation item) or one
evaluation item (refseg, grefseg, reaseg, intseg: `RECORDKEY#i`). The item goes through exactly the
path of training and `xsam predict` (`Predictor.forward_item`: template 0, the builder's
preprocessing, a seeded region sampler), then the task's post-processing (spec §6,
`xsam.model.postprocess`) with the evaluation thresholds of the model's config. The outputs are the
entries `xsam.eval.predictions` reads, so the evaluation job scores its own predictions with the same
code a user scores the official X-SAM's with:

- genseg / ovseg: a panoptic PNG (ids as RGB) with its `segments_info`, the semantic map as one COCO
  result per class, and the instance detections as COCO results (thing classes only);
- refseg / reaseg: the best query's mask; grefseg: the OR of the confident queries (empty = no
  target); intseg: X-SAM's prompt-overlap selection; vgdseg: instance detections labelled with the
  prompted category; gcgseg: the generated caption, its phrases and one mask per phrase.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from xsam.data.schema import Item, Record
from xsam.data import masks as mask_codec
from xsam.data.vprompts import rasterise_prompt
from xsam.eval.groundtruth import upstream_image_id
from xsam.eval.panoptic import id_to_rgb
from xsam.model import postprocess
from xsam.model.predict import Predictor, grounded_item


def id_png(ids: np.ndarray) -> bytes:
    """An id map as panopticapi's RGB PNG (id = R + 256 G + 256² B)."""
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class UnitPredictor:
    """Predictions of one loaded model for evaluation units (see the module docstring)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.post = predictor.loaded.config.postprocess

    def genseg(self, record: Record, item: Item, image: bytes, categories: Sequence[dict[str, Any]],
               thing_ids: set[int] | None = None) -> dict[str, Any]:
        """{"panoptic": {"png", "image_id", "segments_info"}, "semantic": [...], "instance": [...]} for one record."""
        class_logits, mask_logits, geometry = self.predictor.forward_item(record, item, image)
        span_category = [s.category_id for s in item.spans]
        thing = {c["id"]: bool(c.get("isthing", True)) for c in categories}
        is_thing = [thing.get(cid, True) for cid in span_category]
        instance_thing = is_thing if thing_ids is None else [cid in thing_ids for cid in span_category]
        image_id = upstream_image_id(record)
        restore = geometry.restore
        pan = postprocess.panoptic(class_logits, mask_logits, restore, is_thing=is_thing,
                                   threshold=self.post.panoptic_threshold, overlap_threshold=self.post.overlap_threshold,
                                   mask_threshold=self.post.mask_threshold)
        ids = pan.segmentation.cpu().numpy()
        panoptic = {"png": id_png(ids), "image_id": image_id,
                    "segments_info": [{"id": s.id, "category_id": span_category[s.label]} for s in pan.segments]}
        sem = postprocess.semantic(class_logits, mask_logits, restore).cpu().numpy()
        semantic = [{"image_id": image_id, "category_id": span_category[k], "segmentation": mask_codec.encode_json(sem == k),
                     "score": 1.0} for k in np.unique(sem).tolist()]
        inst = postprocess.instance(class_logits, mask_logits, restore, is_thing=instance_thing,
                                    threshold=0.0, mask_threshold=self.post.mask_threshold)
        instance = [{"image_id": image_id, "category_id": span_category[label], "segmentation": mask_codec.encode_json(m.cpu().numpy()),
                     "score": round(float(score), 6)}
                    for m, label, score in zip(inst.masks, inst.labels.tolist(), inst.scores.tolist())]
        return {"panoptic": panoptic, "semantic": semantic, "instance": instance}

    def referring(self, task: str, record: Record, item: Item, image: bytes) -> dict[str, Any]:
        """{"key", "segmentation"} for one refseg / grefseg / reaseg / intseg item (null: empty)."""
        class_logits, mask_logits, geometry = self.predictor.forward_item(record, item, image)
        restore = geometry.restore
        if task == "grefseg":
            found = postprocess.generalized_referring(class_logits, mask_logits, restore,
                                                      score_threshold=self.post.gres_score_threshold,
                                                      mask_threshold=self.post.mask_threshold)
            mask = found.mask.cpu().numpy()
            return {"key": item.key, "segmentation": None if found.empty else mask_codec.encode_json(mask), "score": found.score}
        if task == "intseg":
            prompt = record.visual_prompts[item.spans[0].prompt_index]
            h, w = geometry.original_size
            prompt_mask = torch.from_numpy(rasterise_prompt(prompt, h, w)).to(mask_logits.device)
            found1 = postprocess.interactive(class_logits, mask_logits, restore,
                                             prompt_mask=prompt_mask,
                                             mask_threshold=self.post.mask_threshold)
        else:
            found1 = postprocess.referring(class_logits, mask_logits, restore, mask_threshold=self.post.mask_threshold)
        return {"key": item.key, "segmentation": mask_codec.encode_json(found1.mask.cpu().numpy()), "score": found1.score}

    def vgdseg(self, record: Record, item: Item, image: bytes) -> list[dict[str, Any]]:
        """COCO results: instance detections over the prompted regions, labelled with each region's category."""
        class_logits, mask_logits, geometry = self.predictor.forward_item(record, item, image)
        by_id = {s.id: s for s in record.segments}
        categories = []
        for span in item.spans:
            prompt = record.visual_prompts[span.prompt_index]
            targets = [by_id[i] for i in prompt.segment_ids if i in by_id]
            categories.append(targets[0].category_id if targets else None)
        found = postprocess.instance(class_logits, mask_logits, geometry.restore, is_thing=None, threshold=0.0,
                                     mask_threshold=self.post.mask_threshold)
        image_id = upstream_image_id(record)
        return [{"image_id": image_id, "category_id": categories[label], "segmentation": mask_codec.encode_json(m.cpu().numpy()),
                 "score": round(float(score), 6)}
                for m, label, score in zip(found.masks, found.labels.tolist(), found.scores.tolist())
                if categories[label] is not None]

    def gcgseg(self, record: Record, item: Item, image: bytes, max_new_tokens: int = 256) -> dict[str, Any]:
        """{"image_id", "caption", "phrases", "segmentations", "scores"}: the generated grounded caption."""
        text = self.predictor.generate_caption(record, item, image, max_new_tokens)
        grounded, phrases = grounded_item(item, text)
        out: dict[str, Any] = {"image_id": upstream_image_id(record), "caption": text, "phrases": [],
                               "segmentations": [], "scores": []}
        if not grounded.segs:
            return out
        class_logits, mask_logits, geometry = self.predictor.forward_item(record, grounded, image)
        for phrase, found in zip(phrases, postprocess.grounded(class_logits, mask_logits, geometry.restore,
                                                               num_phrases=len(phrases),
                                                               mask_threshold=self.post.mask_threshold)):
            out["phrases"].append(phrase)
            out["segmentations"].append(mask_codec.encode_json(found.mask.cpu().numpy()))
            out["scores"].append(round(found.score, 6))
        return out
