"""The LLM side of X-SAM: splice visual tokens into the text, read span and `<SEG>` states back out.

Spec: /work/shared/xsam-spec.md §1.1 (sentinels -200 `<image>` and -300 `<region>`, `cond_ids` /
`seg_ids`), §3 "LLM", "Bridging LLM -> decoder", "Visual prompts", §8 rows "refseg/reaseg `<SEG>`
use" and "Region sampler". Upstream: `xsam/xsam/model/utils/input_process.py` (splicing) and
`xsam/xsam/model/xsam.py` (`_add_special_tokens`, the condition / `<SEG>` embeddings).

- `splice_visual` replaces each `<image>` sentinel by the sample's visual tokens (SigLIP then SAM
  projections, 729 + 1024 in the paper) and each `<region>` sentinel by its region's tokens (1
  max-pooled token on the paper branch, 64 on main), and carries labels / span ids / `<SEG>` ids
  along, so they stay aligned with the LLM's hidden states.
- `span_means` and `seg_states` read the condition embeddings c_k (mean over the k-th `<p>...</p>`
  span, delimiters included) and the `<SEG>` embeddings out of the `llm_projector`-projected
  last-layer hidden states. The paper branch uses every `<SEG>` (one decoder instance each, §8).
- `resize_for_added_tokens` grows (or cuts) the embeddings to the tokenizer after
  `xsam.text.tokens.add_special_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from xsam.text.tokens import ADDED_TOKENS, IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(kw_only=True, slots=True)
class SplicedInputs:
    """The LLM's inputs after splicing, right-padded to the longest sample (all [B, L'] but the embeds).

    `attention_mask` is True on real positions; padding has zero embeddings, label IGNORE_INDEX and
    span / `<SEG>` id -1. `position_ids` is 0..L'-1 on every row: right padding makes that each
    sample's own positions (what HF computes when given none).
    """

    inputs_embeds: Tensor  # [B, L', D]
    attention_mask: Tensor  # [B, L'] bool
    labels: Tensor  # [B, L']
    cond_ids: Tensor  # [B, L']
    seg_ids: Tensor  # [B, L']
    position_ids: Tensor  # [B, L']


def _check_visual(b: int, ids: Tensor, image: Tensor | None, regions: Tensor, dim: int) -> None:
    """Sentinel counts and token shapes of sample `b` (`ids`: its real positions only)."""
    n_image = int((ids == IMAGE_TOKEN_INDEX).sum())
    n_region = int((ids == REGION_TOKEN_INDEX).sum())
    unknown = ids[(ids < 0) & (ids != IMAGE_TOKEN_INDEX) & (ids != REGION_TOKEN_INDEX)]
    if len(unknown):
        raise ValueError(f"sample {b}: input_ids hold negative ids {sorted(set(unknown.tolist()))} "
                         f"other than the sentinels {IMAGE_TOKEN_INDEX} and {REGION_TOKEN_INDEX}")
    want_image = 0 if image is None else 1
    if n_image != want_image:
        given = "no image tokens" if image is None else "image tokens"
        raise ValueError(f"sample {b}: {n_image} <image> sentinels ({IMAGE_TOKEN_INDEX}) but {given} given "
                         f"(expected {want_image})")
    if image is not None and (image.dim() != 2 or image.shape[1] != dim):
        raise ValueError(f"sample {b}: image tokens must be [N_img, {dim}], got {list(image.shape)}")
    if regions.dim() != 3 or regions.shape[2] != dim:
        raise ValueError(f"sample {b}: region tokens must be [R, T, {dim}], got {list(regions.shape)}")
    if n_region != regions.shape[0]:
        raise ValueError(f"sample {b}: {n_region} <region> sentinels ({REGION_TOKEN_INDEX}) but "
                         f"{regions.shape[0]} regions given")


def splice_visual(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    cond_ids: Tensor,
    seg_ids: Tensor,
    embed: Callable[[Tensor], Tensor],
    image_tokens: list[Tensor | None],
    region_tokens: list[Tensor],
) -> SplicedInputs:
    """Embed the text and splice visual tokens in at the sentinels (upstream `input_process.py`).

    Args:
        input_ids, attention_mask, labels, cond_ids, seg_ids: [B, L] as in `xsam.data.batch.Batch`
            (spec §1.1): -200 / -300 where `<image>` / `<region>` stand. Only positions with
            `attention_mask` True are read, so padding may be on either side.
        embed: the LLM's input embedding (`model.get_input_embeddings()`); it only ever sees the
            real (non-negative) token ids, in one call.
        image_tokens: per sample, the [N_img, D] tokens that replace its one `<image>`, or None for
            a text-only sample (which must then have no `<image>`).
        region_tokens: per sample, [R_b, T, D]: region r replaces the r-th `<region>` with T tokens.

    Inserted positions get label IGNORE_INDEX and `<SEG>` id -1. Image tokens get span id -1;
    region tokens get the span id their sentinel had, so a `<p><region></p>` span (a VGD / intseg
    condition, spec §1.3) covers its region tokens and its mean includes them. Visual tokens are
    cast to the embedding's dtype. Raises ValueError, naming the sample, when a sample's sentinel
    counts do not match the tokens given, or it holds other negative ids.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels), ("cond_ids", cond_ids),
                    ("seg_ids", seg_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {list(t.shape)}, input_ids {list(input_ids.shape)}")
    n = input_ids.shape[0]
    if len(image_tokens) != n or len(region_tokens) != n:
        raise ValueError(f"{n} samples but {len(image_tokens)} image and {len(region_tokens)} region token entries")
    mask = attention_mask.bool()
    text = mask & (input_ids >= 0)
    text_embeds = embed(input_ids[text])  # [n_text, D], samples in order
    dim, dtype = text_embeds.shape[-1], text_embeds.dtype
    per_sample = text_embeds.split(text.sum(1).tolist())

    rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (embeds, labels, cond, seg) per sample
    for b in range(n):
        keep = mask[b].nonzero().squeeze(1)
        ids = input_ids[b, keep]
        image, regions = image_tokens[b], region_tokens[b]
        _check_visual(b, ids, image, regions, dim)
        lab, cond, seg = labels[b, keep], cond_ids[b, keep], seg_ids[b, keep]
        embeds: list[Tensor] = []
        meta: list[tuple[Tensor, Tensor, Tensor]] = []
        start = consumed = region = 0
        for pos in (ids < 0).nonzero().squeeze(1).tolist() + [len(ids)]:
            if pos > start:  # the text run before the sentinel
                embeds.append(per_sample[b][consumed : consumed + pos - start])
                meta.append((lab[start:pos], cond[start:pos], seg[start:pos]))
                consumed += pos - start
            if pos == len(ids):
                break
            if ids[pos] == IMAGE_TOKEN_INDEX:
                visual, span = image, -1
            else:
                visual, span = regions[region], int(cond[pos])
                region += 1
            assert visual is not None  # _check_visual: an <image> comes with image tokens
            k = visual.shape[0]
            embeds.append(visual.to(dtype))
            meta.append((lab.new_full((k,), IGNORE_INDEX), cond.new_full((k,), span), seg.new_full((k,), -1)))
            start = pos + 1
        rows.append((  # an empty sample (no real position) keeps empty rows
            torch.cat(embeds) if embeds else per_sample[b][:0],
            torch.cat([m[0] for m in meta]) if meta else lab[:0],
            torch.cat([m[1] for m in meta]) if meta else cond[:0],
            torch.cat([m[2] for m in meta]) if meta else seg[:0],
        ))

    length = max((len(r[0]) for r in rows), default=0)
    device = input_ids.device
    out_embeds = text_embeds.new_zeros((n, length, dim))
    out_mask = torch.zeros((n, length), dtype=torch.bool, device=device)
    out_labels = labels.new_full((n, length), IGNORE_INDEX)
    out_cond = cond_ids.new_full((n, length), -1)
    out_seg = seg_ids.new_full((n, length), -1)
    for b, (e, lab, cond, seg) in enumerate(rows):
        k = len(e)
        out_embeds[b, :k] = e
        out_mask[b, :k] = True
        out_labels[b, :k], out_cond[b, :k], out_seg[b, :k] = lab, cond, seg
    position_ids = torch.arange(length, device=device).expand(n, length).contiguous()
    return SplicedInputs(inputs_embeds=out_embeds, attention_mask=out_mask, labels=out_labels,
                         cond_ids=out_cond, seg_ids=out_seg, position_ids=position_ids)


def _check_pair(name: str, hidden: Tensor, ids: Tensor) -> None:
    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, L, D] and {name} [B, L], got {list(hidden.shape)} and {list(ids.shape)}")


def _consecutive(name: str, b: int, ids: Tensor) -> int:
    """How many distinct ids sample `b` has; ValueError unless they are exactly 0..K-1."""
    present = ids[ids >= 0].unique()
    k = len(present)
    if not torch.equal(present, torch.arange(k, device=ids.device)):
        raise ValueError(f"sample {b}: {name} must be 0..K-1 with every value present, got {present.tolist()}")
    return k


def span_means(hidden: Tensor, cond_ids: Tensor) -> list[Tensor]:
    """Per sample, [K_b, D]: row k is the mean of `hidden` over the positions with `cond_ids == k`.

    Spec §3 "Bridging LLM -> decoder" step 2: c_k is the mean of the `llm_projector`-projected
    last-layer hidden states over the k-th `<p>...</p>` span, delimiters (and spliced region tokens)
    included, so pass the projected states. Sums are accumulated in float32 and cast back.
    """
    _check_pair("cond_ids", hidden, cond_ids)
    out = []
    for b in range(hidden.shape[0]):
        k = _consecutive("cond_ids", b, cond_ids[b])
        inside = cond_ids[b] >= 0
        idx = cond_ids[b][inside]
        sums = hidden.new_zeros((k, hidden.shape[2]), dtype=torch.float32).index_add(0, idx, hidden[b][inside].float())
        counts = torch.bincount(idx, minlength=k).to(torch.float32)
        out.append((sums / counts[:, None]).to(hidden.dtype))
    return out


def seg_states(hidden: Tensor, seg_ids: Tensor) -> list[Tensor]:
    """Per sample, [J_b, D]: row j is `hidden` at the j-th `<SEG>` (the position with `seg_ids == j`).

    Spec §3 "Bridging LLM -> decoder" step 3 and §8 "refseg/reaseg `<SEG>` use": on the paper branch
    every `<SEG>` is kept (one decoder instance each). Pass the `llm_projector`-projected states.
    """
    _check_pair("seg_ids", hidden, seg_ids)
    out = []
    for b in range(hidden.shape[0]):
        j = _consecutive("seg_ids", b, seg_ids[b])
        where = (seg_ids[b] >= 0).nonzero().squeeze(1)
        if len(where) != j:
            raise ValueError(f"sample {b}: a <SEG> id appears at more than one position")
        order = seg_ids[b][where].argsort()
        out.append(hidden[b, where[order]])
    return out


@torch.no_grad()
def resize_for_added_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Resize `model`'s input and output embeddings to `len(tokenizer)` and mean-initialise the rows
    of `<SEG>`, `<p>`, `</p>` (spec §1.1: upstream `xsam.py::_add_special_tokens` resizes to
    `len(tokenizer)` after adding them).

    Call it after `xsam.text.tokens.add_special_tokens`. The added tokens' input (and, when not tied,
    output) rows are set to the mean of the model's other rows below `len(tokenizer)`: a common
    practice (e.g. HF's `mean_resizing`, without its random perturbation) that keeps the new tokens'
    logits and inputs in the range of the trained ones. A model whose embeddings already have
    `len(tokenizer)` rows (already resized, e.g. a stage-2/3 checkpoint) is left untouched, so trained
    rows are never overwritten. Models whose vocabulary is padded beyond the tokenizer (Phi-3: 32064
    rows for 32011 + 3 tokens) are cut down to `len(tokenizer)`, as upstream does; the added tokens
    then take rows that were padding, which are re-initialised here too.
    """
    size = len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] == size:
        return
    added = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    if any(i is None or i >= size or i == tokenizer.unk_token_id for i in added):
        raise ValueError(f"tokenizer lacks {ADDED_TOKENS}: call xsam.text.add_special_tokens(tokenizer) first")
    model.resize_token_embeddings(size, mean_resizing=False)
    if model.get_input_embeddings().weight.is_meta:  # a parameter count: shapes only, no values to set
        return
    base = torch.ones(size, dtype=torch.bool)
    base[added] = False
    layers = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0]:
        layers.append(output.weight)
    for weight in layers:
        keep = base.to(weight.device)
        weight[~keep] = weight[keep].float().mean(0).to(weight.dtype)
