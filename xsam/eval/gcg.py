"""Grounded Conversation Generation (GCG) metrics, GLaMM's protocol (spec §5, gcgseg row).

Reference: mbzuai-oryx/groundingLMM `eval/gcg/evaluate.py` and `eval/utils.py::compute_iou` at
commit e74865f207d02c8cbb54795758b855acd6bb51bb (the caption clean-up is `eval/gcg/infer.py`'s).
X-SAM scores GCG with the same rules (wanghao9610/X-SAM@2e76946bcd690d40ac473a50753ac23e1a138330
`xsam/xsam/evaluation/evaluators/img_gcgseg_evaluator.py`, `utils/cococapeval.py`, `utils/miou.py`).

- METEOR, CIDEr: pycocoevalcap's PTBTokenizer (ground truth and predictions tokenised separately,
  as `COCOEvalCap.evaluate` does), then `Meteor().compute_score` and `Cider().compute_score` over
  all samples, one reference caption per sample. GLaMM prints the raw scores; its paper (and X-SAM's)
  reports them x100, as here.
- AP50: COCOeval "segm" with every mask in one category (`xsam.eval.coco.mask_ap`). GLaMM gives
  every predicted mask score 1.0; X-SAM passes each segment's score (`GcgSample.pred_scores`).
- mIoU: per sample, `compute_miou`: the IoU matrix (predictions x ground truth), then greedily take
  the largest entry while it is > 0, delete its row and column, and average the IoUs taken (unmatched
  masks on either side add nothing; a sample with no pair scores 0). The mean over all samples.
- recall: per sample, `find_best_matches`: greedily take the largest IoU (ground truth x
  predictions); stop at the first pick whose IoU < 0.5 or whose phrase similarity < 0.5 (the loop
  ends there, even if a smaller-IoU pair would pass), otherwise count it and zero its row and column.
  Ground-truth phrase i goes with ground-truth mask i and predicted phrase j with predicted mask j.
  Recall = matched / number of ground-truth phrases over all samples. A phrase is embedded as the mean
  of BERT's last hidden states over all its tokens, [CLS] and [SEP] included (`get_bert_embedding`,
  one phrase at a time, max 512 tokens), and pairs are compared by cosine similarity.

All values are percentages (0-100).
"""

from __future__ import annotations

import atexit
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from xsam.eval.coco import mask_ap

JAVA_MISSING = (
    "METEOR needs a Java runtime: install one (e.g. `apt-get install default-jre-headless`, "
    "which `make system-deps` does)"
)
_TAG = re.compile(r"<.*?>")


@dataclass(kw_only=True, slots=True)
class GcgSample:
    """One image's ground truth and prediction.

    key: the image's name, used in error messages (unique within an evaluation).
    gt_caption, gt_phrases, gt_masks: the reference caption, its grounded phrases and one mask per
        phrase (H x W, bool or 0/1 integers), in the same order.
    pred_caption, pred_phrases, pred_masks: the model's caption (markup such as `<p>`, `</p>`,
        `<SEG>` is stripped before scoring), the phrases it grounded and its masks. The model may give
        more or fewer phrases than masks: predicted phrase j goes with mask j, as GLaMM pairs them.
    pred_scores: one confidence per predicted mask, for AP50; None scores every mask 1.0 (GLaMM).
    """

    key: str
    gt_caption: str
    gt_phrases: list[str]
    gt_masks: list[np.ndarray]
    pred_caption: str
    pred_phrases: list[str]
    pred_masks: list[np.ndarray]
    pred_scores: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.gt_phrases) != len(self.gt_masks):
            raise ValueError(
                f"GcgSample {self.key!r}: {len(self.gt_phrases)} ground-truth phrases but "
                f"{len(self.gt_masks)} masks; give one mask per phrase"
            )
        if self.pred_scores is not None and len(self.pred_scores) != len(self.pred_masks):
            raise ValueError(
                f"GcgSample {self.key!r}: {len(self.pred_scores)} pred_scores for {len(self.pred_masks)} "
                "pred_masks; give one score per mask or None"
            )
        self.gt_masks = [_as_bool_mask(m, self.key, f"gt_masks[{i}]") for i, m in enumerate(self.gt_masks)]
        self.pred_masks = [_as_bool_mask(m, self.key, f"pred_masks[{i}]") for i, m in enumerate(self.pred_masks)]
        shapes = {m.shape for m in self.gt_masks + self.pred_masks}
        if len(shapes) > 1:
            raise ValueError(
                f"GcgSample {self.key!r}: masks of different sizes {sorted(shapes)}; resize the predicted "
                "masks to the image size of the ground truth"
            )

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the masks; (1, 1) when the sample has none (nothing to size)."""
        masks = self.gt_masks or self.pred_masks
        return (int(masks[0].shape[0]), int(masks[0].shape[1])) if masks else (1, 1)


def strip_markup(text: str) -> str:
    """The caption without grounding markup, as GLaMM's `infer.py` cleans it: every `<...>` tag
    (`<p>`, `</p>`, `<SEG>`, ...) and `[SEG]` removed, whitespace collapsed, outer quotes stripped."""
    text = _TAG.sub("", text).replace("[SEG]", "")
    return " ".join(text.split()).strip("'").strip()


def caption_scores(samples: Sequence[GcgSample]) -> dict[str, float]:
    """{"METEOR", "CIDEr"} of the predicted captions against the references, in percent (x100).

    Both captions are stripped of markup (`strip_markup`) first. CIDEr's n-gram weights come from
    the evaluated references themselves, so it needs several samples (with one it is 0). METEOR
    runs pycocoevalcap's Java jar; its process is started once (it loads a paraphrase table for
    several seconds) and kept for later calls until `stop_meteor()` or exit.
    """
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_MISSING)
    _check_samples(samples)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {s.key: [{"caption": strip_markup(s.gt_caption)}] for s in samples}
    candidates = {s.key: [{"caption": strip_markup(s.pred_caption)}] for s in samples}
    tokenizer = PTBTokenizer()
    references = tokenizer.tokenize(references)
    candidates = tokenizer.tokenize(candidates)
    missing = [s.key for s in samples if s.key not in references or s.key not in candidates]
    if missing:
        raise RuntimeError(
            f"caption_scores: the PTB tokenizer (Java) returned nothing for {missing[:5]}; check that "
            "`java -version` works and that pycocoevalcap's tokenizer folder is writable"
        )
    meteor = _meteor_score(references, candidates)
    cider, _ = Cider().compute_score(references, candidates)
    return {"METEOR": float(meteor) * 100.0, "CIDEr": float(cider) * 100.0}


def mask_scores(samples: Sequence[GcgSample]) -> dict[str, float]:
    """{"AP50", "mIoU"} in percent: COCO mask AP at IoU 0.5 with all masks in one category, and
    GLaMM's best-match mIoU averaged over the samples (see the module docstring).

    Images are handed to COCOeval in the order of their keys, as GLaMM's image names are: with
    equal scores the detections of earlier images rank first, which moves AP50.
    """
    _check_samples(samples)
    # COCOeval visits images in sorted-id order, and with equal scores (GLaMM's 1.0 for every mask)
    # that order ranks the detections; GLaMM's ids are the image names, so images go by key.
    image_ids = {key: n for n, key in enumerate(sorted(s.key for s in samples), start=1)}
    images, annotations, results = [], [], []
    for sample in samples:
        image_id = image_ids[sample.key]
        height, width = sample.image_size
        images.append({"id": image_id, "height": height, "width": width})
        for mask in sample.gt_masks:
            rle = _encode(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                }
            )
        scores = sample.pred_scores if sample.pred_scores is not None else [1.0] * len(sample.pred_masks)
        for mask, score in zip(sample.pred_masks, scores):
            results.append({"image_id": image_id, "category_id": 1, "segmentation": _encode(mask), "score": score})
    if not annotations:
        raise ValueError("mask_scores: no sample has a ground-truth mask, so AP50 is undefined; check the ground truth")
    ap = mask_ap(images, annotations, [{"id": 1, "name": "object"}], results)
    mious = [_paired_miou(_iou_matrix(s.pred_masks, s.gt_masks)) for s in samples]
    return {"AP50": ap.stats["AP50"], "mIoU": float(np.mean(mious)) * 100.0}


class TextSimilarity:
    """Cosine similarity of phrases embedded by a BERT model read from a local folder (GLaMM uses
    bert-base-uncased): the mean of the last hidden states over all tokens, [CLS] and [SEP] included.

    model_path: a folder holding a transformers model and its tokenizer (config.json, weights,
        vocab). Nothing is downloaded: the folder is read with `local_files_only=True`.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        fix = (
            f"download bert-base-uncased there (e.g. `huggingface-cli download google-bert/bert-base-uncased "
            f"--local-dir {path}`) and set that folder as the benchmark config key `text_model`"
        )
        if not path.is_dir():
            raise FileNotFoundError(f"TextSimilarity: no model folder at {path}; {fix}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"TextSimilarity: {path} has no config.json, so no model; {fix}")
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"TextSimilarity: cannot load a model from {path} ({err}); {fix}") from err
        self._model.eval()
        self._embeddings: dict[str, np.ndarray] = {}

    def embed(self, text: str) -> np.ndarray:
        """The phrase's embedding: mean of the last hidden states of its tokens (max 512), float32."""
        if text not in self._embeddings:
            import torch

            inputs = self._tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
            with torch.no_grad():
                hidden = self._model(**inputs).last_hidden_state[0]
            self._embeddings[text] = hidden.mean(dim=0).float().numpy()
        return self._embeddings[text]

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity matrix, len(a) x len(b) (0 for an all-zero embedding)."""
        if not len(a) or not len(b):
            return np.zeros((len(a), len(b)))
        return _unit_rows([self.embed(t) for t in a]) @ _unit_rows([self.embed(t) for t in b]).T


def recall(
    samples: Sequence[GcgSample],
    similarity: TextSimilarity,
    *,
    iou_threshold: float = 0.5,
    text_threshold: float = 0.5,
) -> float:
    """Percent of ground-truth phrase-mask pairs recalled by a predicted pair (IoU >= iou_threshold
    and phrase cosine >= text_threshold), with GLaMM's greedy matching (module docstring). 0 when
    the samples have no ground-truth phrase, as GLaMM reports it.

    A pick whose predicted mask has no phrase (more masks than phrases) ends GLaMM's matching of
    that image with an IndexError that its loop catches, losing the image's matches; that is kept:
    such a sample recalls nothing.
    """
    if not 0 < iou_threshold <= 1 or not 0 < text_threshold <= 1:
        raise ValueError(
            f"recall: thresholds must lie in (0, 1] (a threshold of 0 never ends the greedy matching), "
            f"got iou_threshold={iou_threshold}, text_threshold={text_threshold}"
        )
    _check_samples(samples)
    matched = 0
    positives = 0
    for sample in samples:
        positives += len(sample.gt_phrases)
        ious = _iou_matrix(sample.gt_masks, sample.pred_masks)
        if ious.size == 0:
            continue
        texts = similarity.similarity(sample.gt_phrases, sample.pred_phrases)
        matched += _count_matches(ious, texts, iou_threshold, text_threshold)
    return matched / positives * 100.0 if positives else 0.0


def gcg_scores(samples: Sequence[GcgSample], *, text_model: str | Path | None) -> dict[str, float]:
    """METEOR, CIDEr, AP50, mIoU and, when `text_model` names a local BERT folder, recall (the key
    is absent otherwise), all in percent."""
    scores = caption_scores(samples)
    scores.update(mask_scores(samples))
    if text_model is not None:
        scores["recall"] = recall(samples, TextSimilarity(text_model))
    return scores


def stop_meteor() -> None:
    """Stop the METEOR Java process that `caption_scores` keeps (it is also stopped at exit)."""
    global _METEOR
    with _METEOR_GUARD:
        if _METEOR is None:
            return
        meteor, _METEOR = _METEOR, None
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        # A failed compute_score leaves pycocoevalcap's lock held; its __del__ would wait on it forever.
        if meteor.lock.locked():
            meteor.lock.release()


_METEOR = None
_METEOR_GUARD = threading.Lock()
atexit.register(stop_meteor)


def _meteor_score(references: dict[str, list[str]], candidates: dict[str, list[str]]) -> float:
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    with _METEOR_GUARD:
        if _METEOR is not None and _METEOR.meteor_p.poll() is not None:
            _METEOR = None
        if _METEOR is None:
            _METEOR = Meteor()
        meteor = _METEOR
    try:
        with _METEOR_GUARD:
            score, _ = meteor.compute_score(references, candidates)
    except Exception as err:
        stop_meteor()
        raise RuntimeError(
            f"caption_scores: METEOR (Java, pycocoevalcap meteor-1.5.jar) failed: {err!r}; check that "
            "`java -version` works and that 2 GB of memory are free for it"
        ) from err
    return float(score)


def _check_samples(samples: Sequence[GcgSample]) -> None:
    if not samples:
        raise ValueError("GCG evaluation: no samples were given")
    seen: set[str] = set()
    for sample in samples:
        if sample.key in seen:
            raise ValueError(f"GCG evaluation: sample key {sample.key!r} appears twice; give each image once")
        seen.add(sample.key)


def _as_bool_mask(mask: np.ndarray, key: str, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"GcgSample {key!r}: {name} has shape {mask.shape}; masks are H x W")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise ValueError(
        f"GcgSample {key!r}: {name} has dtype {mask.dtype}; binarise it first (GLaMM keeps logits > 0)"
    )


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _iou_matrix(rows: Sequence[np.ndarray], cols: Sequence[np.ndarray]) -> np.ndarray:
    """IoU of every pair (GLaMM's `compute_iou`); two empty masks have IoU 0 (GLaMM divides 0 by 0)."""
    ious = np.zeros((len(rows), len(cols)))
    col_areas = [int(np.count_nonzero(c)) for c in cols]
    for i, r in enumerate(rows):
        row_area = int(np.count_nonzero(r))
        for j, c in enumerate(cols):
            inter = int(np.count_nonzero(np.logical_and(r, c)))
            union = row_area + col_areas[j] - inter
            ious[i, j] = inter / union if union else 0.0
    return ious


def _paired_miou(ious: np.ndarray) -> float:
    """GLaMM's `compute_miou` on a predictions x ground-truth IoU matrix (a fraction, 0-1)."""
    paired = []
    while ious.size > 0 and np.max(ious) > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        paired.append(ious[i, j])
        ious = np.delete(np.delete(ious, i, axis=0), j, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def _count_matches(ious: np.ndarray, texts: np.ndarray, iou_threshold: float, text_threshold: float) -> int:
    """GLaMM's `find_best_matches` on ground truth x predictions matrices; the number of matches."""
    ious = ious.copy()
    texts = texts.copy()
    matches = 0
    while ious.size > 0:
        g, p = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[g, p] < iou_threshold:
            break
        if p >= texts.shape[1]:
            return 0  # GLaMM: IndexError on text_sims, caught per image, its matches are lost
        if texts[g, p] < text_threshold:
            break
        matches += 1
        ious[g, :] = 0
        ious[:, p] = 0
        texts[g, :] = 0
        texts[:, p] = 0
    return matches


def _unit_rows(vectors: list[np.ndarray]) -> np.ndarray:
    matrix = np.stack(vectors).astype(np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
