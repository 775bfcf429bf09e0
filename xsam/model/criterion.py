"""X-SAM's training losses: the segmentation criterion and the LLM's next-token loss.

Spec: /work/shared/xsam-spec.md §3 "Losses" and §8 "Losses and weights". L = 1.0·L_llm + 1.0·L_seg,
L_seg = Σ over the last and auxiliary decoder layers of [2.0·CE_cls + 5.0·BCE_mask + 5.0·Dice]:
softmax CE over [conditions…, bg] with weight 0.1 on bg, and BCE/Dice on 12544 points chosen by
uncertainty (oversample 3×, 75% most uncertain, 25% uniform). Adapted from Mask2Former's criterion
(facebookresearch/Mask2Former `modeling/criterion.py`, transformers `Mask2FormerLoss`). Unlike it,
the number of conditions K changes from batch to batch (the class weight vector is built per call),
an `ignore` region is left out of BCE/Dice, and the random points come from a `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import sample_point

from xsam.model.matcher import HungarianMatcher, valid_point_weights
from xsam.text.tokens import IGNORE_INDEX


@dataclass(kw_only=True, slots=True)
class LayerPrediction:
    """One decoder layer's predictions for the N `<SEG>` instances of a batch.

    Conditions are padded per batch to a common K (padded logits very negative, spec §3), and
    the last class is the background.
    """

    class_logits: Tensor  # [N, Q, K+1]
    mask_logits: Tensor  # [N, Q, h, w]


@dataclass(kw_only=True, slots=True)
class InstanceTarget:
    """The targets of one `<SEG>` instance. A gRefCOCO no-target `<SEG>` has T = 0."""

    masks: Tensor  # [T, H, W] bool, at the seg canvas resolution
    classes: Tensor  # [T] int64, indices into the K conditions
    ignore: Tensor | None = None  # [H, W] bool: left out of the mask losses and matching costs


def uncertain_point_coords(
    mask_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former's `get_uncertain_point_coords_with_randomness`, with a generator.

    Draws `num_points · oversample_ratio` uniform points per mask, keeps the
    `importance_sample_ratio · num_points` whose logits are closest to 0 (most uncertain) and
    fills the rest with fresh uniform points. `mask_logits` is [M, h, w]; returns [M, P, 2] in [0, 1].
    """
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    coords = torch.rand(num_masks, num_sampled, 2, generator=generator, device=device)
    logits = sample_point(mask_logits[:, None].float(), coords, align_corners=False)[:, 0]  # [M, S]
    top = torch.topk(-logits.abs(), k=num_uncertain, dim=1).indices
    uncertain = torch.gather(coords, 1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(num_masks, num_points - num_uncertain, 2, generator=generator, device=device)
    return torch.cat([uncertain, uniform], dim=1)


class SegCriterion(nn.Module):
    """Hungarian-matched class + mask losses over the decoder layers (spec §3 "Losses").

    Args:
        class_weight: weight of the class CE, in the loss and in the matching cost (spec: 2.0).
        mask_weight: weight of the point-sampled sigmoid BCE, loss and cost (spec: 5.0).
        dice_weight: weight of the point-sampled Dice, loss and cost (spec: 5.0).
        no_object_weight: CE weight of the background class (spec: 0.1); most queries are
            unmatched, and at full weight they would swamp the few matched ones.
        num_points: points per matched mask, and for the matching cost (spec: 12544).
        oversample_ratio: uniform candidates per kept point for uncertainty sampling (spec: 3.0).
        importance_sample_ratio: share of the points taken from the most uncertain candidates;
            the rest are uniform (spec: 0.75).
    """

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if oversample_ratio < 1:
            raise ValueError(f"SegCriterion: oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"SegCriterion: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.matcher = HungarianMatcher(
            cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight, num_points=num_points
        )

    def forward(
        self,
        layers: Sequence[LayerPrediction],
        targets: Sequence[InstanceTarget],
        generator: torch.Generator | None = None,
        num_masks: float | None = None,
    ) -> dict[str, Tensor]:
        """Losses of all decoder layers; each layer is matched to the targets on its own.

        Args:
            layers: per-layer predictions in decoder order; the last one is the final output, the
                others are auxiliary.
            targets: one entry per instance (the N of `LayerPrediction`).
            generator: source of all random points (on the logits' device), for reproducibility.
            num_masks: the mask-loss normaliser. Default: this batch's target count; a data-parallel
                trainer passes the count averaged over ranks, as Mask2Former all-reduces it, so a
                rank with few masks does not weigh each of them more.

        Returns:
            Unweighted `loss_ce`, `loss_mask`, `loss_dice` of the last layer, `loss_ce_{i}`,
            `loss_mask_{i}`, `loss_dice_{i}` of auxiliary layer i, and `loss_seg`, the weighted sum
            over all layers (the term that enters the total loss).
        """
        if not layers:
            raise ValueError("SegCriterion: no decoder layer outputs were given")
        if num_masks is None:
            num_masks = sum(t.classes.numel() for t in targets)
        num_masks = max(float(num_masks), 1.0)
        # Every layer samples the same targets: convert them to float once, not per layer.
        dense = [InstanceTarget(masks=t.masks.float(), classes=t.classes, ignore=t.ignore) for t in targets]
        losses: dict[str, Tensor] = {}
        total = layers[0].mask_logits.new_zeros((), dtype=torch.float32)
        for index, layer in enumerate(layers):
            suffix = "" if index == len(layers) - 1 else f"_{index}"
            loss_ce, loss_mask, loss_dice = self._layer_losses(layer, dense, num_masks, generator)
            losses[f"loss_ce{suffix}"] = loss_ce
            losses[f"loss_mask{suffix}"] = loss_mask
            losses[f"loss_dice{suffix}"] = loss_dice
            total = total + self.class_weight * loss_ce + self.mask_weight * loss_mask + self.dice_weight * loss_dice
        losses["loss_seg"] = total
        return losses

    def _layer_losses(
        self,
        layer: LayerPrediction,
        targets: Sequence[InstanceTarget],
        num_masks: float,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(CE, BCE, Dice) of one layer, the mask terms divided by `num_masks`."""
        class_logits, mask_logits = layer.class_logits, layer.mask_logits
        if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(
                f"SegCriterion: expected class_logits [N, Q, K+1] and mask_logits [N, Q, h, w] with the same "
                f"N and Q, got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
            )
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"SegCriterion: {class_logits.shape[0]} predicted instances but {len(targets)} targets")
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        background = num_classes - 1
        class_targets = torch.full(class_logits.shape[:2], background, dtype=torch.int64, device=device)
        matched_preds: list[Tensor] = []
        matched_masks: list[Tensor] = []
        matched_ignore: list[tuple[Tensor | None, int]] = []
        for n, target in enumerate(targets):
            queries, rows = self.matcher(
                class_logits[n], mask_logits[n], target.masks, target.classes, target.ignore, generator
            )
            class_targets[n, queries] = target.classes[rows]
            matched_preds.append(mask_logits[n, queries])
            matched_masks.append(target.masks[rows])
            matched_ignore.append((target.ignore, rows.numel()))
        # K changes per batch, so the class weights are built per call (spec §3: bg weight 0.1).
        class_weights = torch.ones(num_classes, device=device)
        class_weights[background] = self.no_object_weight
        loss_ce = F.cross_entropy(
            class_logits.float().reshape(-1, num_classes), class_targets.reshape(-1), weight=class_weights
        )
        preds = torch.cat(matched_preds)
        if preds.shape[0] == 0:
            # No target in the batch: keep the mask logits in the graph so every parameter gets a grad.
            zero = mask_logits.float().sum() * 0.0
            return loss_ce, zero, zero
        loss_mask, loss_dice = self._mask_losses(preds, torch.cat(matched_masks), matched_ignore, num_masks, generator)
        return loss_ce, loss_mask, loss_dice

    def _mask_losses(
        self,
        preds: Tensor,
        masks: Tensor,
        ignore: Sequence[tuple[Tensor | None, int]],
        num_masks: float,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and Dice of matched pairs: `preds` [M, h, w] logits, `masks` [M, H, W].

        `ignore` holds, per instance in order, its [H, W] ignore region (or None) and how many of
        the M pairs are its own; each region is sampled once, not copied per pair.
        """
        with torch.no_grad():
            coords = uncertain_point_coords(
                preds, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
            )
            labels = sample_point(masks[:, None].float(), coords, align_corners=False)[:, 0]
            weights = torch.cat(
                [
                    torch.ones(count, self.num_points, device=coords.device)
                    if region is None
                    else valid_point_weights(region[None], part.reshape(1, -1, 2)).reshape(count, -1)
                    for (region, count), part in zip(ignore, coords.split([c for _, c in ignore]), strict=True)
                ]
            )
        logits = sample_point(preds[:, None].float(), coords, align_corners=False)[:, 0]  # [M, P]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss_mask = ((bce * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).sum() / num_masks
        probs = logits.sigmoid() * weights
        numerator = 2 * (probs * labels).sum(-1)
        denominator = probs.sum(-1) + (labels * weights).sum(-1)
        loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
        return loss_mask, loss_dice


def llm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy on the answer tokens (spec §3: L_llm), mean over supervised tokens.

    `logits` [B, L, V] predict position t+1 from position t, so they are shifted against `labels`
    [B, L] (`ignore_index` outside the answers). A batch with no supervised token gives 0, still
    attached to the graph.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"llm_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")
    return total / (shifted_labels != ignore_index).sum().clamp(min=1)
