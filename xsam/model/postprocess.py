"""Post-processing: one decoder instance's final-layer predictions -> task outputs (spec §6).

Every function takes the predictions of ONE decoder instance (`ClassHead`, `MaskDecoder`):
- `class_logits` [Q, K+1]: K condition columns, then the background (no-object) column (§3 Bridging 5-6).
  Padded condition columns hold a very negative logit (-1e9 on the paper branch), so their probability is 0.
- `mask_logits` [Q, h, w]: mask logits at decoder resolution (1/8 of the SAM canvas, §3 "Mask decoder").
- `restore`: maps [n, h, w] low-resolution logits to [n, H, W] logits at the original image size; in practice
  `Geometry.restore` (bilinear to the canvas, crop to `scaled_size`, bilinear to H×W, as detectron2's
  `sem_seg_postprocess`). It must accept n = 0 (returning [0, H, W]): that is how the output size is learned when
  nothing is kept.

Memory: restoring all queries at once costs Q·S²·4 bytes for the canvas intermediate plus Q·H·W·4 for the result
(200 queries at S = 1024: 800 MB + ~250 MB for a 640×480 image), which is what Mask2Former's docstring warns about
("resizing predictions before inference will cause OOM error"). So each function first decides from the class
probabilities which queries it needs, and restores only those, `chunk_size` rows at a time, folding each chunk into
a running result (a per-pixel running arg-max for panoptic, a running sum for semantic). Peak memory is then one
chunk plus the output itself; the results do not depend on `chunk_size`.

Shared step (§6): class probabilities are a softmax over [conditions..., background] with the background column
dropped afterwards (`class_probs`).

Which function each task uses:
- genseg / ovseg: `panoptic` (PQ), `semantic` (mIoU), `instance` with `is_thing` (mask AP). Mask2Former's
  `panoptic_inference`, `semantic_inference` and `instance_inference` (facebookresearch/Mask2Former,
  `mask2former/maskformer_model.py`) are the reference semantics; the code here is written from spec §6.
- refseg / reaseg: `referring` (the best query for the instance's own condition; on the paper branch the
  conditions of the whole batch are shared by every instance, §8, so pass the instance's condition index).
- gRefCOCO: `generalized_referring` (OR of the confident queries; `empty` for no-target evaluation).
- gcgseg: `grounded` (one mask per generated `<p>…</p>` phrase).
- intseg: `interactive` (X-SAM scores every query as an instance, keeps the confident ones, and returns the one
  that overlaps the visual prompt most). `referring` is the simpler alternative the spec's §6 wording suggests.
- vgdseg: `instance` with `is_thing=None` (the instance logic over the prompted categories, class-aware AP).

Labels are condition indices 0..K-1; mapping them to dataset category ids is the evaluator's job. Masks and
segmentation maps stay on the device `restore` returns (the predictions' device when nothing is kept); `instance`'s
labels and scores are CPU tensors, other scores Python floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

RestoreFn = Callable[[Tensor], Tensor]
"""[n, h, w] low-resolution mask logits -> [n, H, W] logits at the original image size (e.g. `Geometry.restore`)."""

DEFAULT_CHUNK_SIZE = 16


@dataclass(kw_only=True, slots=True)
class Segment:
    """One panoptic segment. `id` is its value in `PanopticResult.segmentation`; `label` a condition index; `score`
    the class probability of its query (the highest one for a merged stuff segment); `area` its pixel count."""

    id: int
    label: int
    is_thing: bool
    score: float
    area: int


@dataclass(kw_only=True, slots=True)
class PanopticResult:
    """`segmentation` [H, W] int32: 0 = void, 1..n = `segments[i].id`. With each segment's label this is what
    panopticapi needs (its PNG id and `segments_info`); ids are not `label * label_divisor + k` encoded."""

    segmentation: Tensor
    segments: list[Segment]


@dataclass(kw_only=True, slots=True)
class InstanceResult:
    """N detections sorted by score, highest first: `masks` [N, H, W] bool, `labels` [N] int64 condition indices,
    `scores` [N] float32."""

    masks: Tensor
    labels: Tensor
    scores: Tensor


@dataclass(kw_only=True, slots=True)
class ReferringResult:
    """One selected query: its `mask` [H, W] bool at the original size, its `score` and its index `query`."""

    mask: Tensor
    score: float
    query: int


@dataclass(kw_only=True, slots=True)
class GeneralizedReferringResult:
    """gRefCOCO output: `mask` [H, W] bool is the OR of the masks of `queries` (ascending); `query` is the most
    probable one (always in `queries`); `score` the mean probability over `queries`, as X-SAM reports it;
    `empty` is True when the mask has no pixel, the prediction used for no-target samples."""

    mask: Tensor
    score: float
    query: int
    queries: list[int]
    empty: bool


def class_probs(class_logits: Tensor) -> Tensor:
    """[..., K+1] logits -> [..., K] probabilities: softmax over [conditions..., background], background dropped
    (spec §6 shared steps). Computed in float32 so bf16 logits do not lose the small probabilities."""
    if class_logits.ndim < 1 or class_logits.shape[-1] < 2 or not class_logits.is_floating_point():
        raise ValueError(
            f"class_logits must be floating [..., K+1] with K >= 1 conditions plus the background column, got "
            f"{class_logits.dtype} {tuple(class_logits.shape)}"
        )
    return F.softmax(class_logits.float(), dim=-1)[..., :-1]


def panoptic(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    is_thing: Sequence[bool],
    threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PanopticResult:
    """Panoptic segmentation (genseg / ovseg PQ), Mask2Former's `panoptic_inference` (spec §6 "Panoptic").

    1. score, label = max / arg-max of the softmax over all K+1 columns; keep a query when its label is not the
       background and score > `threshold` (0.0 for evaluation, 0.5 for visualisation).
    2. Each pixel goes to the kept query with the largest score·σ(mask) (first query on ties).
    3. A query becomes a segment from the pixels assigned to it where its own σ(mask) > `mask_threshold`; it is
       dropped when nothing is assigned, its mask is empty, or its assigned area < `overlap_threshold` × its
       original area (pixels with σ > `mask_threshold`): a mostly occluded query is not a segment.
    4. Stuff labels (`is_thing[label]` False) are merged into one segment per label; things get one id each.
       Pixels of dropped queries, and assigned pixels below the mask threshold, are void (0).

    Args:
        class_logits: [Q, K+1] logits, background last.
        mask_logits: [Q, h, w] mask logits at decoder resolution.
        restore: [n, h, w] -> [n, H, W] logits at the original size; called only on kept queries.
        is_thing: per condition (length K), whether it is a thing class; entries of padded columns are unused.
        threshold: minimum class score of a kept query (strict).
        overlap_threshold: minimum assigned / original area of a segment (detectron2's
            `overlap_threshold`, HF's `overlap_mask_area_threshold`).
        mask_threshold: σ(mask) above which a pixel belongs to a query's mask.
        chunk_size: queries restored at once; bounds memory, does not change the result.

    The spec's "label divisor 1000" is detectron2 metadata (`label_divisor`), not used here: segment ids 1..n and
    each segment's label are what panopticapi's PNG + `segments_info` need.

    X-SAM itself calls a copy of transformers' DETR `compute_segments`, which differs from Mask2Former (and from
    this function) in four ways: the original area counts score·σ >= 0.5 rather than σ; every assigned pixel is
    painted, also where σ <= 0.5; a segment needs assigned / original > 0.8 strictly; and on the paper branch a
    merged stuff segment resets the id counter, so the next new segment can reuse an existing id.
    """
    num_queries, num_conditions = _check_predictions(class_logits, mask_logits)
    thing = _check_is_thing(is_thing, num_conditions, required=True)
    _check_chunk_size(chunk_size)
    probs = F.softmax(class_logits.float(), dim=-1)
    scores, labels = probs.max(dim=-1)
    kept = ((labels != num_conditions) & (scores > threshold)).nonzero().flatten()
    if kept.numel() == 0:
        height, width = _output_size(mask_logits, restore)
        return PanopticResult(
            segmentation=torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device), segments=[]
        )
    kept_scores = scores[kept]

    # Running per-pixel arg-max over the kept queries, chunk by chunk. `above` records whether the winning query's
    # own σ exceeds mask_threshold at that pixel, so step 3 needs no second restore. Strict `>` across chunks keeps
    # the first maximum, as a single arg-max over all kept queries would.
    best_value = best_index = above = None
    original_area = torch.zeros(kept.numel(), dtype=torch.int64)
    for start, logits in _restored_chunks(mask_logits, kept, restore, chunk_size):
        sigmoid = logits.sigmoid()
        value, index = (kept_scores[start : start + len(sigmoid)].to(sigmoid.device)[:, None, None] * sigmoid).max(0)
        index_above = sigmoid.gather(0, index[None])[0] > mask_threshold
        original_area[start : start + len(sigmoid)] = (sigmoid > mask_threshold).flatten(1).sum(1).cpu()
        if best_value is None:
            best_value, best_index, above = value, index + start, index_above
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + start, best_index)
            above = torch.where(better, index_above, above)
    assert best_index is not None and above is not None  # kept is non-empty, so the loop ran
    assigned_area = torch.bincount(best_index.flatten(), minlength=kept.numel()).cpu()
    painted_area = torch.bincount(best_index[above], minlength=kept.numel()).cpu()

    segment_of_query = [0] * kept.numel()  # kept position -> segment id (0 = dropped)
    segments: list[Segment] = []
    stuff_segment: dict[int, Segment] = {}
    for k in range(kept.numel()):
        assigned, original, painted = int(assigned_area[k]), int(original_area[k]), int(painted_area[k])
        if assigned == 0 or original == 0 or painted == 0 or assigned / original < overlap_threshold:
            continue
        label = int(labels[kept[k]])
        score = float(kept_scores[k])
        if not thing[label] and label in stuff_segment:
            merged = stuff_segment[label]
            merged.area += painted
            merged.score = max(merged.score, score)
            segment_of_query[k] = merged.id
            continue
        segment = Segment(id=len(segments) + 1, label=label, is_thing=thing[label], score=score, area=painted)
        segments.append(segment)
        if not thing[label]:
            stuff_segment[label] = segment
        segment_of_query[k] = segment.id
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=best_index.device)
    segmentation = torch.where(above, lookup[best_index], torch.zeros((), dtype=torch.int32, device=above.device))
    return PanopticResult(segmentation=segmentation, segments=segments)


def semantic(
    class_logits: Tensor, mask_logits: Tensor, restore: RestoreFn, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Semantic segmentation (mIoU), Mask2Former's `semantic_inference` (spec §6 "Semantic"):
    [H, W] int64 = argmax_c Σ_q p(c|q)·σ(m_q), with no threshold, so every query is restored.

    The sum is accumulated chunk by chunk, so memory is one chunk plus the [K, H·W] accumulator. Padded conditions
    have p = 0 and are never chosen (unless every probability underflows to 0, where the arg-max is 0).
    """
    num_queries, _ = _check_predictions(class_logits, mask_logits)
    _check_chunk_size(chunk_size)
    probs = class_probs(class_logits)
    total: Tensor | None = None  # [K, H·W], summed in place so no second [K, H, W] is allocated per chunk
    size: tuple[int, ...] = ()
    every_query = torch.arange(num_queries, device=mask_logits.device)
    for start, logits in _restored_chunks(mask_logits, every_query, restore, chunk_size):
        size = tuple(logits.shape[1:])
        weights = probs[start : start + len(logits)].to(logits.device).T  # [K, c]
        if total is None:
            total = weights @ logits.sigmoid().flatten(1)
        else:
            total.addmm_(weights, logits.sigmoid().flatten(1))
    assert total is not None  # Q >= 1 is checked, so the loop ran
    return total.argmax(dim=0).reshape(size)


def instance(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    is_thing: Sequence[bool] | None = None,
    top_k: int | None = None,
    threshold: float = 0.0,
    mask_threshold: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> InstanceResult:
    """Instance segmentation (mask AP; genseg/ovseg with `is_thing`, vgdseg without), Mask2Former's
    `instance_inference` (spec §6 "Instance").

    1. The `top_k` (default Q) largest p(c|q) over all (query, condition) pairs; ties go to the lower flattened
       index (query-major), so the selection is deterministic. Pairs with p exactly 0 are dropped: they are padded
       condition columns (logit -1e9) whose label names no category.
    2. With `is_thing`, only pairs of thing conditions are kept (after the top-k, as Mask2Former does).
    3. mask = σ(restored logits) > `mask_threshold` (i.e. logits > 0 at the default 0.5); score = p(c|q) × mean σ
       inside the mask (0 for an empty mask; Mask2Former adds 1e-6 to the pixel count instead).
    4. Pairs with score >= `threshold` are returned, sorted by score, highest first (stable).

    Only the distinct queries of the pairs left after steps 1-2 are restored, each once.
    """
    num_queries, num_conditions = _check_predictions(class_logits, mask_logits)
    thing = _check_is_thing(is_thing, num_conditions, required=False)
    _check_chunk_size(chunk_size)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for the number of queries, {num_queries}), got {top_k}")
    probs = class_probs(class_logits).flatten()
    count = min(num_queries if top_k is None else top_k, probs.numel())
    top_probs, top_pairs = torch.sort(probs, descending=True, stable=True)
    top_probs, top_pairs = top_probs[:count], top_pairs[:count]
    keep = top_probs > 0
    labels = top_pairs % num_conditions
    if thing is not None:
        keep &= torch.tensor(thing, dtype=torch.bool, device=labels.device)[labels]
    top_probs, labels, queries = top_probs[keep], labels[keep], top_pairs[keep] // num_conditions

    distinct, which = torch.unique(queries, return_inverse=True)
    if distinct.numel() == 0:
        height, width = _output_size(mask_logits, restore)
        return InstanceResult(
            masks=torch.zeros(0, height, width, dtype=torch.bool, device=mask_logits.device),
            labels=torch.zeros(0, dtype=torch.int64),
            scores=torch.zeros(0, dtype=torch.float32),
        )
    mask_chunks: list[Tensor] = []
    mean_inside = torch.zeros(distinct.numel(), dtype=torch.float32)
    for start, logits in _restored_chunks(mask_logits, distinct, restore, chunk_size):
        sigmoid = logits.sigmoid()
        inside = sigmoid > mask_threshold
        pixels = inside.flatten(1).sum(1).clamp(min=1)
        mean_inside[start : start + len(sigmoid)] = ((sigmoid * inside).flatten(1).sum(1) / pixels).cpu()
        mask_chunks.append(inside)
    masks = torch.cat(mask_chunks)
    scores = top_probs.cpu() * mean_inside[which.cpu()]
    passed = (scores >= threshold).nonzero().flatten()
    order = passed[torch.sort(scores[passed], descending=True, stable=True).indices]
    return InstanceResult(
        masks=masks[which.cpu()[order].to(masks.device)],
        labels=labels.cpu()[order],
        scores=scores[order],
    )


def referring(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    condition: int = 0,
    mask_threshold: float = 0.5,
) -> ReferringResult:
    """refseg / reaseg (spec §6): the query most probable for `condition`, its mask at σ > `mask_threshold`.

    Only that query is restored. The query is chosen on log-probabilities, which rank like the probabilities but
    do not all underflow to 0 when the background dominates every query.
    """
    _, num_conditions = _check_predictions(class_logits, mask_logits)
    _check_condition(condition, num_conditions)
    log_probs = F.log_softmax(class_logits.float(), dim=-1)[:, condition]
    query = int(log_probs.argmax())
    logits = _restore_rows(mask_logits, torch.tensor([query], device=mask_logits.device), restore)
    return ReferringResult(
        mask=logits[0].sigmoid() > mask_threshold, score=float(log_probs[query].exp()), query=query
    )


def generalized_referring(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    condition: int = 0,
    score_threshold: float = 0.6,
    mask_threshold: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> GeneralizedReferringResult:
    """gRefCOCO (spec §6): the OR of the masks (σ > `mask_threshold`) of every query with p(condition|q) >=
    `score_threshold`, plus the most probable query, which is always included. An expression may refer to
    several objects or to none; `empty` is the no-target prediction. Only the selected queries are restored.
    """
    _, num_conditions = _check_predictions(class_logits, mask_logits)
    _check_condition(condition, num_conditions)
    _check_chunk_size(chunk_size)
    log_probs = F.log_softmax(class_logits.float(), dim=-1)[:, condition]
    probs = log_probs.exp()
    best = int(log_probs.argmax())
    selected = probs >= score_threshold
    selected[best] = True
    queries = selected.nonzero().flatten()
    mask: Tensor | None = None
    for _, logits in _restored_chunks(mask_logits, queries, restore, chunk_size):
        part = (logits.sigmoid() > mask_threshold).any(dim=0)
        mask = part if mask is None else mask | part
    assert mask is not None  # the best query is always selected
    return GeneralizedReferringResult(
        mask=mask,
        score=float(probs[queries].mean()),
        query=best,
        queries=[int(q) for q in queries],
        empty=not bool(mask.any()),
    )


def grounded(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    num_phrases: int,
    mask_threshold: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[ReferringResult]:
    """GCG (spec §6): for each generated phrase k < `num_phrases` (condition k), the `referring` result.

    A query chosen by several phrases is restored once; phrases sharing a query share the mask tensor.
    """
    _, num_conditions = _check_predictions(class_logits, mask_logits)
    _check_chunk_size(chunk_size)
    if not 0 <= num_phrases <= num_conditions:
        raise ValueError(
            f"num_phrases={num_phrases} must be in [0, {num_conditions}] (the condition columns of class_logits); "
            f"pass the number of <p>...</p> phrases the answer generated"
        )
    if num_phrases == 0:
        return []
    log_probs = F.log_softmax(class_logits.float(), dim=-1)[:, :num_phrases]
    best = log_probs.argmax(dim=0)  # [P]
    distinct, which = torch.unique(best, return_inverse=True)
    chunks = _restored_chunks(mask_logits, distinct, restore, chunk_size)
    masks = torch.cat([logits.sigmoid() > mask_threshold for _, logits in chunks])
    return [
        ReferringResult(mask=masks[int(which[k])], score=float(log_probs[best[k], k].exp()), query=int(best[k]))
        for k in range(num_phrases)
    ]


def interactive(
    class_logits: Tensor,
    mask_logits: Tensor,
    restore: RestoreFn,
    *,
    prompt_mask: Tensor,
    condition: int = 0,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    match: Literal["box", "mask"] = "box",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ReferringResult:
    """intseg (COCO-Interactive), as X-SAM's intseg post-processing does it (spec §6 "intseg / vgdseg").

    Every query is scored as an instance for `condition` (p(c|q) × mean σ inside its mask, see `instance`);
    candidates are the queries with score >= `threshold` plus the best-scoring one; the candidate overlapping
    the visual prompt most is returned (ties: higher score, then lower query). `match="box"` compares bounding
    boxes (the paper branch's `pairwise_iou`), `match="mask"` the masks (X-SAM main's `pairwise_mask_iou`).

    Args:
        prompt_mask: [H, W] bool, the visual prompt (point disk, scribble, box or mask) at the original size.

    Every query is restored once to score it (chunked), and the chosen query once more for its mask.
    """
    num_queries, num_conditions = _check_predictions(class_logits, mask_logits)
    _check_condition(condition, num_conditions)
    _check_chunk_size(chunk_size)
    if match not in ("box", "mask"):
        raise ValueError(f"match must be 'box' (paper branch) or 'mask' (X-SAM main), got {match!r}")
    if prompt_mask.ndim != 2 or prompt_mask.dtype != torch.bool or not bool(prompt_mask.any()):
        raise ValueError(
            f"prompt_mask must be a non-empty bool [H, W] mask at the original image size, got "
            f"{prompt_mask.dtype} {tuple(prompt_mask.shape)} with {int(prompt_mask.sum())} pixels"
        )
    probs = class_probs(class_logits)[:, condition]
    every_query = torch.arange(num_queries, device=mask_logits.device)
    mean_inside = torch.zeros(num_queries, dtype=torch.float32)
    overlap = torch.zeros(num_queries, dtype=torch.float32)
    prompt_box = _boxes(prompt_mask[None])
    for start, logits in _restored_chunks(mask_logits, every_query, restore, chunk_size):
        if logits.shape[1:] != prompt_mask.shape:
            raise ValueError(
                f"prompt_mask is {tuple(prompt_mask.shape)} but restore gives {tuple(logits.shape[1:])}: pass the "
                f"prompt at the original image size"
            )
        sigmoid = logits.sigmoid()
        inside = sigmoid > mask_threshold
        pixels = inside.flatten(1).sum(1)
        mean_inside[start : start + len(sigmoid)] = ((sigmoid * inside).flatten(1).sum(1) / pixels.clamp(min=1)).cpu()
        if match == "box":
            iou = _box_iou(_boxes(inside), prompt_box.to(inside.device))
        else:
            prompt = prompt_mask.to(inside.device)
            intersection = (inside & prompt).flatten(1).sum(1)
            union = pixels + int(prompt.sum()) - intersection
            iou = intersection / union.clamp(min=1)
        overlap[start : start + len(sigmoid)] = iou.float().cpu()
    scores = probs.cpu() * mean_inside
    candidates = ((scores >= threshold) | (scores == scores.max())).nonzero().flatten()
    by_score = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    query = int(by_score[overlap[by_score].argmax()])
    logits = _restore_rows(mask_logits, torch.tensor([query], device=mask_logits.device), restore)
    return ReferringResult(mask=logits[0].sigmoid() > mask_threshold, score=float(scores[query]), query=query)


# -- helpers -----------------------------------------------------------------------------------------------------


def _check_predictions(class_logits: Tensor, mask_logits: Tensor) -> tuple[int, int]:
    """(Q, K) of one instance's predictions, or a ValueError saying which argument is malformed."""
    if class_logits.ndim != 2 or class_logits.shape[1] < 2 or not class_logits.is_floating_point():
        raise ValueError(
            f"class_logits must be floating [Q, K+1] (K >= 1 conditions, background last) for ONE decoder instance, "
            f"got {class_logits.dtype} {tuple(class_logits.shape)}; index the batch first (logits[i])"
        )
    if mask_logits.ndim != 3 or not mask_logits.is_floating_point():
        raise ValueError(
            f"mask_logits must be floating [Q, h, w] for ONE decoder instance, got {mask_logits.dtype} "
            f"{tuple(mask_logits.shape)}; index the batch first (masks[i])"
        )
    if class_logits.shape[0] != mask_logits.shape[0] or class_logits.shape[0] == 0:
        raise ValueError(
            f"class_logits {tuple(class_logits.shape)} and mask_logits {tuple(mask_logits.shape)} must have the "
            f"same number of queries Q >= 1; pass the same layer's (final) predictions for both"
        )
    return int(class_logits.shape[0]), int(class_logits.shape[1]) - 1


def _check_is_thing(is_thing: Sequence[bool] | None, num_conditions: int, *, required: bool) -> list[bool] | None:
    if is_thing is None:
        if required:
            raise ValueError(f"is_thing is required: one bool per condition ({num_conditions})")
        return None
    if len(is_thing) != num_conditions:
        raise ValueError(
            f"is_thing has {len(is_thing)} entries but class_logits has K={num_conditions} condition columns (K+1 "
            f"with the background); give one bool per condition, padded columns included"
        )
    return [bool(value) for value in is_thing]


def _check_condition(condition: int, num_conditions: int) -> None:
    if not 0 <= condition < num_conditions:
        raise ValueError(
            f"condition={condition} is out of range: class_logits has K={num_conditions} condition columns "
            f"(the last of the K+1 is the background); pass 0 <= condition < {num_conditions}"
        )


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (queries restored at once), got {chunk_size}")


def _restore_rows(mask_logits: Tensor, queries: Tensor, restore: RestoreFn) -> Tensor:
    """restore(mask_logits[queries]) as float32, checked to be [len(queries), H, W]."""
    restored = restore(mask_logits.index_select(0, queries))
    if restored.ndim != 3 or restored.shape[0] != queries.numel() or not restored.is_floating_point():
        raise ValueError(
            f"restore must map [n, h, w] logits to floating [n, H, W] logits; for n={queries.numel()} it returned "
            f"{restored.dtype} {tuple(restored.shape)}"
        )
    return restored.float()


def _restored_chunks(
    mask_logits: Tensor, queries: Tensor, restore: RestoreFn, chunk_size: int
) -> Iterator[tuple[int, Tensor]]:
    """Yield (offset, restored [c, H, W] float32 logits of queries[offset : offset + c]), `chunk_size` at a time."""
    size: tuple[int, ...] | None = None
    for start in range(0, queries.numel(), chunk_size):
        restored = _restore_rows(mask_logits, queries[start : start + chunk_size], restore)
        if size is not None and restored.shape[1:] != size:
            raise ValueError(f"restore returned {tuple(restored.shape[1:])} after {size}: it must be deterministic")
        size = restored.shape[1:]
        yield start, restored


def _output_size(mask_logits: Tensor, restore: RestoreFn) -> tuple[int, int]:
    """(H, W) from restoring no rows, for results where nothing is kept."""
    restored = _restore_rows(mask_logits, torch.zeros(0, dtype=torch.int64, device=mask_logits.device), restore)
    return int(restored.shape[1]), int(restored.shape[2])


def _boxes(masks: Tensor) -> Tensor:
    """[N, H, W] bool -> [N, 4] (x0, y0, x1, y1) float boxes, exclusive max (detectron2 `BitMasks`); empty -> 0s."""
    x0, x1 = _extent(masks.any(dim=1))  # columns hit, [N, W]
    y0, y1 = _extent(masks.any(dim=2))  # rows hit, [N, H]
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _extent(hit: Tensor) -> tuple[Tensor, Tensor]:
    """[N, L] bool -> first hit index and last hit index + 1 per row; (0, 0) for a row without hits."""
    positions = torch.arange(hit.shape[1], device=hit.device)
    first = torch.where(hit, positions, hit.shape[1]).min(dim=1).values
    end = torch.where(hit, positions + 1, 0).max(dim=1).values
    nonempty = hit.any(dim=1)
    return torch.where(nonempty, first, 0), end


def _box_iou(boxes: Tensor, box: Tensor) -> Tensor:
    """IoU of each of [N, 4] boxes with one [1, 4] box; 0 where the union is empty."""
    top_left = torch.maximum(boxes[:, :2], box[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], box[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    union = areas + (box[0, 2:] - box[0, :2]).prod() - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))
