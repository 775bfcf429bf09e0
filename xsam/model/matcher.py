"""Hungarian matching of decoder queries to the target masks of one `<SEG>` instance.

Spec: /work/shared/xsam-spec.md §3 "Losses" and §8 "Losses and weights": the matching cost is
2.0 · (−p(target class)) + 5.0 · mask BCE + 5.0 · Dice, the mask terms on the same 12544 random
points for predictions and targets. Adapted from Mask2Former's matcher
(facebookresearch/Mask2Former `modeling/matcher.py`, transformers `Mask2FormerHungarianMatcher`),
with two additions: an `ignore` region whose points do not count, and a `torch.Generator` so a
step's matching is reproducible.

The assignment itself is scipy's `linear_sum_assignment`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_assignment
from torch import Tensor, nn
from transformers.models.mask2former.modeling_mask2former import sample_point


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of rows to columns (scipy's solver), rows ascending.

    Non-finite entries (a NaN or inf prediction) are replaced by a cost larger than any assignment
    of finite entries, so they are chosen only when nothing else is left (Mask2Former does the
    same); scipy itself refuses a matrix with NaN.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be 2-D, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        finite = cost[np.isfinite(cost)]
        big = (np.abs(finite).max() + 1.0 if finite.size else 1.0) * (min(cost.shape) + 1)
        cost = np.where(np.isfinite(cost), cost, big)
    rows, cols = scipy_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def valid_point_weights(ignore: Tensor, coords: Tensor) -> Tensor:
    """1.0 at points that may count in a mask cost or loss, 0.0 at points touching `ignore`.

    `ignore` is [N, H, W] bool, `coords` [N, P, 2] in [0, 1] (x, y), as `sample_point`. A point is
    dropped when any of the pixels its bilinear sample reads is ignored, so changing a target inside
    the ignore region cannot change the result. Returns [N, P] float.
    """
    touched = sample_point(ignore[:, None].float(), coords, align_corners=False)[:, 0]
    return (touched <= 0).float()


def pairwise_mask_costs(pred: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Point-sampled BCE and Dice costs of every (prediction, target) pair.

    `pred` [Q, P] logits, `target` [T, P] in [0, 1], `weight` [P] (0 at ignored points) or None.
    BCE is the mean over counted points, Dice is `1 − (2·Σpy + 1) / (Σp + Σy + 1)` over counted
    points, as Mask2Former's `pair_wise_sigmoid_cross_entropy_loss` / `pair_wise_dice_loss`.
    Returns two [Q, T] tensors.
    """
    w = torch.ones_like(pred[0]) if weight is None else weight
    num_valid = w.sum().clamp(min=1.0)
    bce_pos = nn.functional.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    bce_neg = nn.functional.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    cost_bce = ((bce_pos * w) @ target.T + (bce_neg * w) @ (1 - target).T) / num_valid
    prob = pred.sigmoid() * w
    numerator = 2 * prob @ target.T
    denominator = prob.sum(-1)[:, None] + (target * w).sum(-1)[None, :]
    cost_dice = 1 - (numerator + 1) / (denominator + 1)
    return cost_bce, cost_dice


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to the targets of one decoder instance (spec §3).

    Args:
        cost_class: weight of the class cost −p(target class) (spec: 2.0).
        cost_mask: weight of the point-sampled sigmoid BCE (spec: 5.0).
        cost_dice: weight of the point-sampled Dice cost (spec: 5.0).
        num_points: random points shared by all predictions and targets (spec: 12544 = 112²);
            sampling them instead of comparing full masks keeps the cost matrix cheap at 1024².
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0; set one above 0")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        target_masks: Tensor,
        target_classes: Tensor,
        ignore: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The weighted [Q, T] matching cost; see `forward` for the arguments."""
        _check_instance(class_logits, mask_logits, target_masks, target_classes, ignore)
        cost_class = -class_logits.float().softmax(-1)[:, target_classes]
        coords = torch.rand(1, self.num_points, 2, generator=generator, device=mask_logits.device)
        pred = sample_point(mask_logits[None].float(), coords, align_corners=False)[0]  # [Q, P]
        target = sample_point(target_masks[None].float(), coords, align_corners=False)[0]  # [T, P]
        weight = None if ignore is None else valid_point_weights(ignore[None], coords)[0]
        cost_bce, cost_dice = pairwise_mask_costs(pred, target, weight)
        return self.cost_class * cost_class + self.cost_mask * cost_bce + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        target_masks: Tensor,
        target_classes: Tensor,
        ignore: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match one instance's queries to its targets.

        Args:
            class_logits: [Q, K+1] logits over the instance's K conditions and the background.
            mask_logits: [Q, h, w] mask logits (any resolution: points are in normalised coordinates).
            target_masks: [T, H, W] bool (or float in [0, 1]), at the seg canvas resolution.
            target_classes: [T] int64, indices into the K conditions.
            ignore: [H, W] bool; points touching it do not count in the mask costs.
            generator: source of the random points (on `mask_logits`' device), for reproducibility.

        Returns:
            (query indices, target indices), int64 [min(Q, T)] each, query indices ascending.
        """
        device = mask_logits.device
        if target_masks.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty.clone()
        cost = self.cost_matrix(class_logits, mask_logits, target_masks, target_classes, ignore, generator)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return (
            torch.as_tensor(rows, dtype=torch.int64, device=device),
            torch.as_tensor(cols, dtype=torch.int64, device=device),
        )


def _check_instance(
    class_logits: Tensor, mask_logits: Tensor, target_masks: Tensor, target_classes: Tensor, ignore: Tensor | None
) -> None:
    """Raise a ValueError naming the mismatch between one instance's predictions and targets."""
    if class_logits.ndim != 2 or mask_logits.ndim != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"expected class_logits [Q, K+1] and mask_logits [Q, h, w] with the same Q, got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    if target_masks.ndim != 3 or target_classes.shape != target_masks.shape[:1]:
        raise ValueError(
            f"expected target_masks [T, H, W] and target_classes [T], got "
            f"{tuple(target_masks.shape)} and {tuple(target_classes.shape)}"
        )
    num_conditions = class_logits.shape[1] - 1
    if target_classes.numel() and (target_classes.min() < 0 or target_classes.max() >= num_conditions):
        raise ValueError(
            f"target_classes must index the {num_conditions} conditions (the last logit is the background), "
            f"got {target_classes.tolist()}"
        )
    if ignore is not None and ignore.shape != target_masks.shape[1:]:
        raise ValueError(f"ignore must be [H, W] = {tuple(target_masks.shape[1:])}, got {tuple(ignore.shape)}")
