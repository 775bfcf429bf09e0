"""The X-SAM network: one `nn.Module` over the parts of spec §3, consuming `xsam.data.batch.Batch`.

Forward pass (stage 3, every part present; spec §3, §8 paper branch):
1. SigLIP -> `visual_projector`: 729 tokens per image; SAM -> penultimate state -> `seg_projector`:
   1024 tokens (dual encoder), spliced after the SigLIP tokens at `<image>`.
2. `<region>` sentinels get `RegionSampler` tokens pooled from the `seg_projector` grid of the image
   `Batch.region_sources` names (a VGD negative pools another sample's image).
3. The LLM runs on the spliced embeddings; its next-token loss is computed on answer tokens only (the
   LM head runs on supervised positions only: at Phi-3 size full-sequence logits are 4k x 32k floats).
4. `llm_projector` on the last (normed) hidden states; condition c_k = span mean over `<p>...</p>`
   (delimiters and region tokens included); one decoder *instance* per `<SEG>`, its projected
   embedding added to every learned query. Instances of `conditions.shared_tasks` samples
   (refseg, reaseg) share the batch's concatenated conditions, labels offset per sample (§3.7);
   the others see their own sample's conditions, padded to a common K.
5. SAM states 12/18/24 -> `seg_connector` -> Mask2Former decoder (pixel decoder once per image,
   repeated per instance) -> per-layer class logits (`ClassHead`, cosine + background) and masks,
   matched and scored by `SegCriterion` against the masks that `<SEG>` answers.

Stage 1 builds no LLM: one instance per image, no `<SEG>` embedding, `LinearClassHead` (133 + 1),
the targets' class = `mask_spans` (stage-1 items list the vocabulary in id order). Stage 2 builds no
decoder: the LLM loss only. Which parts exist is decided when the model is built
(`xsam.model.build.build_xsam`), from the stage's `components`.

This module imports neither Ray, DeepSpeed nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xsam.data.batch import Batch
from xsam.model.connector import MLPProjector, SegConnector, SegTokenProjector
from xsam.model.criterion import InstanceTarget, LayerPrediction, SegCriterion
from xsam.model.decoder import ClassHead, LinearClassHead, MaskDecoder
from xsam.model.encoders import SegEncoder, VisionEncoder
from xsam.model.llm import seg_states, span_means, splice_visual
from xsam.model.sampler import RegionSampler
from xsam.text.tokens import IGNORE_INDEX


@dataclass(kw_only=True, slots=True)
class Instances:
    """Which `<SEG>` each decoder instance answers, and where its sample's conditions sit.

    `condition_offset[n]` is the column of the sample's condition 0 in instance n's condition row
    (non-zero only for shared-condition tasks), `num_conditions[n]` how many of the row's columns
    are the sample's own.
    """

    sample: Tensor  # [N] batch index
    seg: Tensor  # [N] which <SEG> of the sample (-1 in stage 1: the image itself)
    condition_offset: Tensor  # [N]
    num_conditions: Tensor  # [N]

    def __len__(self) -> int:
        return int(self.sample.numel())


@dataclass(kw_only=True)
class XSamOutput:
    """What `XSam.forward` returns. Logits are the final decoder layer's; `losses` holds each term
    (unweighted per-layer terms from `SegCriterion`, plus `loss_llm`, `loss_seg` and `loss`)."""

    loss: Tensor | None
    losses: dict[str, Tensor] = field(default_factory=dict)
    instances: Instances | None = None
    class_logits: Tensor | None = None  # [N, Q, K+1], last column background
    mask_logits: Tensor | None = None  # [N, Q, h, w] at stride 8 of the seg canvas
    condition_mask: Tensor | None = None  # [N, K] bool
    supervised_tokens: int = 0


class XSam(nn.Module):
    """X-SAM (arXiv 2508.04655). Parts are keyword arguments; a stage leaves out the ones it does not
    build (None). Build it with `xsam.model.build.build_xsam` rather than by hand.

    Args:
        vision_encoder, visual_projector: SigLIP tower and its MLP into the LLM.
        seg_encoder, seg_projector: SAM encoder and the dual-encoder MLP into the LLM (None
            `seg_projector`: SigLIP tokens only).
        llm: a transformers causal LM whose embeddings already fit the tokenizer (special tokens added).
        llm_projector: MLP from the LLM width to the decoder width.
        seg_connector, decoder, class_head: the segmentation branch; `class_head` is `ClassHead`
            (conditions from the LLM) or `LinearClassHead` (stage 1, no LLM).
        region_sampler: pools `<region>` tokens from the `seg_projector` grid.
        criterion: the segmentation loss; `llm_weight` / `seg_weight` weigh the two losses.
        shared_tasks: tasks whose instances share the batch's conditions (refseg, reaseg).
        decoder_instances: "per_seg" (paper branch: one instance per `<SEG>`, answering that turn's
            masks) or "last_seg" (main: one instance per sample, its last `<SEG>`, answering every
            mask of the sample).
    """

    def __init__(
        self,
        *,
        vision_encoder: VisionEncoder | None = None,
        visual_projector: MLPProjector | None = None,
        seg_encoder: SegEncoder | None = None,
        seg_projector: SegTokenProjector | None = None,
        llm: nn.Module | None = None,
        llm_projector: MLPProjector | None = None,
        seg_connector: SegConnector | None = None,
        decoder: MaskDecoder | None = None,
        class_head: ClassHead | LinearClassHead | None = None,
        region_sampler: RegionSampler | None = None,
        criterion: SegCriterion | None = None,
        llm_weight: float = 1.0,
        seg_weight: float = 1.0,
        shared_tasks: tuple[str, ...] = ("refseg", "reaseg"),
        decoder_instances: str = "per_seg",
    ) -> None:
        super().__init__()
        if decoder_instances not in ("per_seg", "last_seg"):
            raise ValueError(f"decoder_instances must be 'per_seg' (paper) or 'last_seg' (main), got {decoder_instances!r}")
        if llm is not None and (vision_encoder is None or visual_projector is None):
            raise ValueError("XSam: an LLM needs the vision encoder and visual_projector (image tokens)")
        if decoder is not None and (seg_encoder is None or seg_connector is None or class_head is None):
            raise ValueError("XSam: the decoder needs seg_encoder, seg_connector and class_head")
        if decoder is not None and llm is not None and (llm_projector is None or not isinstance(class_head, ClassHead)):
            raise ValueError("XSam: with an LLM the decoder needs llm_projector and the cosine ClassHead")
        if decoder is not None and llm is None and not isinstance(class_head, LinearClassHead):
            raise ValueError("XSam: without an LLM (stage 1) the decoder needs the LinearClassHead")
        self.vision_encoder = vision_encoder
        self.visual_projector = visual_projector
        self.seg_encoder = seg_encoder
        self.seg_projector = seg_projector
        self.llm = llm
        self.llm_projector = llm_projector
        self.seg_connector = seg_connector
        self.decoder = decoder
        self.class_head = class_head
        self.region_sampler = region_sampler or RegionSampler()
        self.criterion = criterion or SegCriterion()
        self.llm_weight = llm_weight
        self.seg_weight = seg_weight
        self.shared_tasks = tuple(shared_tasks)
        self.decoder_instances = decoder_instances

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        batch: Batch,
        *,
        compute_loss: bool = True,
        generator: torch.Generator | None = None,
        num_masks: float | None = None,
    ) -> XSamOutput:
        """Run the network on a dense `Batch`.

        Args:
            batch: from `PackedBatch.to(device)`.
            compute_loss: False for inference (no matching, no LLM loss; logits still returned).
            generator: source of the random points (region sampler, loss), for reproducible steps.
            num_masks: the mask-loss normaliser; a data-parallel trainer passes the number of target
                masks averaged over ranks (Mask2Former all-reduces it). Default: this batch's count.
        """
        images, slot, sam = self._encode_images(batch)
        losses: dict[str, Tensor] = {}
        out = XSamOutput(loss=None, losses=losses)

        if self.llm is None:
            if self.decoder is None:
                raise ValueError("XSam has neither an LLM nor a decoder: nothing to run")
            instances = self._image_instances(batch, images)
            conditions = None
            seg_embeddings = None
        else:
            hidden, labels, cond_ids, seg_ids = self._run_llm(batch, images, slot, sam, generator)
            if compute_loss:
                loss_llm, out.supervised_tokens = self._llm_loss(hidden, labels)
                losses["loss_llm"] = loss_llm
            if self.decoder is None:
                instances = None
            else:
                assert self.llm_projector is not None
                projected = self.llm_projector(hidden)
                instances, conditions, seg_embeddings = self._seg_instances(
                    batch, slot, span_means(projected, cond_ids), seg_states(projected, seg_ids)
                )

        if self.decoder is not None and instances is not None and len(instances) and sam is not None:
            assert self.seg_connector is not None and self.class_head is not None
            features = self.seg_connector(sam.pyramid_states)
            decoded = self.decoder(features, seg_embeddings=seg_embeddings, batch_index=slot[instances.sample])
            layers = []
            for queries, masks in zip(decoded.query_embeddings, decoded.mask_logits, strict=True):
                if isinstance(self.class_head, ClassHead):
                    assert conditions is not None
                    logits = self.class_head(queries, conditions[0], conditions[1])
                else:
                    logits = self.class_head(queries)
                layers.append(LayerPrediction(class_logits=logits, mask_logits=masks))
            out.instances = instances
            out.class_logits, out.mask_logits = layers[-1].class_logits, layers[-1].mask_logits
            out.condition_mask = conditions[1] if conditions is not None else None
            if compute_loss:
                targets = self._targets(batch, instances)
                seg_losses = self.criterion(layers, targets, generator=generator, num_masks=num_masks)
                losses.update(seg_losses)
        elif self.decoder is not None and compute_loss:
            # No <SEG> in this batch (chat): the segmentation branch still joins the graph with a zero
            # term, so every rank reduces the same set of gradients (DDP / ZeRO need no special case).
            zero = self._zero_touch(self.seg_connector, self.decoder, self.class_head, self.llm_projector)
            if sam is not None:  # SAM's last selected blocks feed only the decoder
                zero = zero + sum(state.sum() * 0.0 for state in sam.pyramid_states)
            losses["loss_seg"] = zero

        if compute_loss:
            total = torch.zeros((), device=batch.input_ids.device)
            if "loss_llm" in losses:
                total = total + self.llm_weight * losses["loss_llm"]
            if "loss_seg" in losses:
                total = total + self.seg_weight * losses["loss_seg"]
            if self.vision_encoder is not None and not len(images):  # text-only batch
                total = total + self._zero_touch(self.vision_encoder, self.visual_projector, self.seg_encoder,
                                                 self.seg_projector)
            losses["loss"] = total
            out.loss = total
        return out

    def _encode_images(self, batch: Batch) -> tuple[Tensor, Tensor, Any]:
        """The batch rows with an image, each row's index among them (-1: none), and SAM's states of
        those images (None without a SAM encoder or an image)."""
        images = batch.has_image.nonzero().squeeze(1)
        slot = torch.full((len(batch),), -1, dtype=torch.long, device=batch.has_image.device)
        slot[images] = torch.arange(len(images), device=slot.device)
        sam = self.seg_encoder(batch.seg_pixel_values[images]) if self.seg_encoder is not None and len(images) else None
        return images, slot, sam

    # ------------------------------------------------------------------ LLM side

    def image_tokens(self, batch: Batch, images: Tensor, sam_tokens: Tensor | None) -> Tensor:
        """[B_img, 729 (+1024), D] LLM tokens of the batch's images (SigLIP, then SAM)."""
        assert self.vision_encoder is not None and self.visual_projector is not None
        tokens = [self.visual_projector(self.vision_encoder(batch.pixel_values[images]))]
        if sam_tokens is not None:
            tokens.append(sam_tokens)
        return torch.cat(tokens, dim=1)

    def _splice(self, batch: Batch, images: Tensor, slot: Tensor, sam, generator: torch.Generator | None):
        """The LLM's input embeddings: text with the image and region tokens spliced in (steps 1-2)."""
        assert self.llm is not None
        sam_tokens = None
        if self.seg_projector is not None and sam is not None:
            sam_tokens = self.seg_projector(sam.tokens_state)
        visual = self.image_tokens(batch, images, sam_tokens) if len(images) else None
        per_image: list[Tensor | None] = [
            visual[int(s)] if s >= 0 and visual is not None else None for s in slot.tolist()
        ]
        regions = self._region_tokens(batch, slot, sam_tokens, generator)
        return splice_visual(
            batch.input_ids, batch.attention_mask, batch.labels, batch.cond_ids, batch.seg_ids,
            self.llm.get_input_embeddings(), per_image, regions,
        )

    def _run_llm(
        self, batch: Batch, images: Tensor, slot: Tensor, sam, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self.llm is not None
        spliced = self._splice(batch, images, slot, sam, generator)
        base = self.llm.get_decoder() if hasattr(self.llm, "get_decoder") else self.llm.base_model
        hidden = base(
            inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids, use_cache=False,
        ).last_hidden_state
        return hidden, spliced.labels, spliced.cond_ids, spliced.seg_ids

    def _region_tokens(
        self, batch: Batch, slot: Tensor, sam_tokens: Tensor | None, generator: torch.Generator | None
    ) -> list[Tensor]:
        """Per sample [R_b, T, D] tokens for its `<region>` sentinels (empty where it has none)."""
        counts = [len(r) for r in batch.regions]
        width = self.llm.get_input_embeddings().weight.shape[1]  # type: ignore[union-attr]
        per = self.region_sampler.tokens_per_region
        if not sum(counts):
            empty = batch.pixel_values.new_zeros((0, per, width))
            return [empty for _ in counts]
        if sam_tokens is None:
            raise ValueError("this batch has <region> prompts, which need the SAM tokens (projector.dual_encoder)")
        side = int(round(sam_tokens.shape[1] ** 0.5))
        grid = sam_tokens.reshape(sam_tokens.shape[0], side, side, sam_tokens.shape[2])
        sources = slot[torch.cat(batch.region_sources)]
        if bool((sources < 0).any()):
            raise ValueError("a <region> points at a sample without an image")
        tokens = self.region_sampler(grid, torch.cat(batch.regions), sources, generator=generator)
        return list(tokens.split(counts))

    def _llm_loss(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        """Next-token CE on answer tokens; the LM head runs on the positions that predict one."""
        assert self.llm is not None
        head = self.llm.get_output_embeddings()
        targets = labels[:, 1:]
        where = targets != IGNORE_INDEX
        count = int(where.sum())
        if count == 0:
            return hidden.sum() * 0.0 + self._zero_touch(head), 0
        logits = head(hidden[:, :-1][where])  # [n, V]
        loss = nn.functional.cross_entropy(logits.float(), targets[where], reduction="mean")
        return loss, count

    @torch.no_grad()
    def generate(
        self, batch: Batch, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Greedy continuation of each sample's text (a generation prompt: no answer yet), with the
        image and region tokens spliced in as in `forward`; returns the new token ids [B, T]
        (padded with `pad_token_id` after EOS). GCG generates its caption this way (spec §1.3)."""
        if self.llm is None:
            raise ValueError("XSam.generate needs the LLM (stage 2 or 3)")
        images, slot, sam = self._encode_images(batch)
        spliced = self._splice(batch, images, slot, sam, generator)
        if not bool(spliced.attention_mask.all()):
            # right padding would put the continuation after pad positions; generation takes left padding
            raise ValueError("XSam.generate takes samples of equal spliced length (one prompt, or same-length prompts)")
        return self.llm.generate(
            inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask.long(),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )

    def llm_logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits [B, L, V] (inference, tests); training uses `_llm_loss`."""
        assert self.llm is not None
        return self.llm.get_output_embeddings()(hidden)

    # ------------------------------------------------------------------ decoder side

    def _image_instances(self, batch: Batch, images: Tensor) -> Instances:
        """Stage 1: one instance per image, all its masks as targets."""
        zeros = torch.zeros_like(images)
        return Instances(sample=images, seg=zeros - 1, condition_offset=zeros, num_conditions=zeros)

    def _seg_instances(
        self, batch: Batch, slot: Tensor, conds: list[Tensor], segs: list[Tensor]
    ) -> tuple[Instances, tuple[Tensor, Tensor], Tensor]:
        """One instance per `<SEG>` of every sample with an image; conditions per spec §3.7."""
        device = batch.input_ids.device
        shared = [b for b in range(len(batch)) if batch.tasks[b] in self.shared_tasks and slot[b] >= 0 and len(segs[b])]
        offsets: dict[int, int] = {}
        total = 0
        for b in shared:
            offsets[b] = total
            total += len(conds[b])
        rows: list[Tensor] = []
        sample, seg, offset, own = [], [], [], []
        shared_row = torch.cat([conds[b] for b in shared]) if shared else None
        for b in range(len(batch)):
            if slot[b] < 0 or not len(segs[b]):
                continue
            chosen = range(len(segs[b])) if self.decoder_instances == "per_seg" else [len(segs[b]) - 1]
            for j in chosen:
                sample.append(b)
                seg.append(j)
                offset.append(offsets.get(b, 0))
                own.append(len(conds[b]))
                rows.append(shared_row if b in offsets else conds[b])  # type: ignore[arg-type]
        width = self.class_head.bg_embed.shape[1] if isinstance(self.class_head, ClassHead) else 0
        k = max((len(r) for r in rows), default=0)
        n = len(rows)
        dtype = segs[0].dtype if segs else torch.float32
        condition = torch.zeros((n, k, width), dtype=dtype, device=device)
        mask = torch.zeros((n, k), dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            condition[i, : len(r)] = r
            mask[i, : len(r)] = True
        used = [segs[b] if self.decoder_instances == "per_seg" else segs[b][-1:] for b in range(len(batch))
                if slot[b] >= 0 and len(segs[b])]
        seg_embeddings = torch.cat(used) if n else None
        instances = Instances(
            sample=torch.tensor(sample, dtype=torch.long, device=device),
            seg=torch.tensor(seg, dtype=torch.long, device=device),
            condition_offset=torch.tensor(offset, dtype=torch.long, device=device),
            num_conditions=torch.tensor(own, dtype=torch.long, device=device),
        )
        return instances, (condition, mask), seg_embeddings  # type: ignore[return-value]

    def _targets(self, batch: Batch, instances: Instances) -> list[InstanceTarget]:
        out = []
        for b, j, off in zip(instances.sample.tolist(), instances.seg.tolist(), instances.condition_offset.tolist()):
            every = j < 0 or self.decoder_instances == "last_seg"  # stage 1, or main's one instance per sample
            rows = torch.ones_like(batch.mask_segs[b], dtype=torch.bool) if every else batch.mask_segs[b] == j
            ignore = batch.ignore[b] if bool(batch.ignore[b].any()) else None
            classes = batch.mask_spans[b][rows] + off
            if isinstance(self.class_head, LinearClassHead) and len(classes) and int(classes.max()) >= (
                self.class_head.linear.out_features - 1
            ):
                raise ValueError(
                    f"{batch.keys[b]}: class {int(classes.max())} beyond the linear head's "
                    f"{self.class_head.linear.out_features - 1} classes (stage 1 expects the vocabulary in id order)"
                )
            out.append(InstanceTarget(masks=batch.masks[b][rows], classes=classes, ignore=ignore))
        return out

    @staticmethod
    def _zero_touch(*modules: nn.Module | None) -> Tensor:
        """0 * (sum of the trainable parameters of `modules`): they join the graph with zero gradients.
        Parameters partitioned by ZeRO-3 (`ds_id`) are left out: outside their module's forward they
        hold no data, and ZeRO-3 reduces whatever gradients exist."""
        terms = [p.sum() * 0.0 for m in modules if m is not None for p in m.parameters()
                 if p.requires_grad and not hasattr(p, "ds_id")]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    # ------------------------------------------------------------------ bookkeeping

    def parts(self) -> dict[str, nn.Module]:
        """The parts present, by name (`xsam.model.config.COMPONENTS` order)."""
        from xsam.model.config import COMPONENTS

        return {name: getattr(self, name) for name in COMPONENTS if getattr(self, name) is not None}
