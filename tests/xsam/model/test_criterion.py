"""Hungarian matcher, segmentation criterion and LLM loss (spec §3 "Losses", §8 "Losses and weights")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from transformers.models.mask2former.modeling_mask2former import sample_point

from xsam.model.criterion import InstanceTarget, LayerPrediction, SegCriterion, llm_loss, uncertain_point_coords
from xsam.model.matcher import HungarianMatcher, linear_sum_assignment

SIZE = 64
POINTS = 2000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _boxes(count: int, size: int = SIZE) -> torch.Tensor:
    """`count` distinct, overlapping-free rectangles, [count, size, size] bool."""
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    step = size // count
    for i in range(count):
        masks[i, i * step : (i + 1) * step, size // 4 : size // 4 + (i + 1) * step // 2 + 4] = True
    return masks


def _perfect_logits(
    masks: torch.Tensor, classes: torch.Tensor, queries: torch.Tensor, num_queries: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and mask logits that predict target t exactly at query `queries[t]`, background elsewhere."""
    class_logits = torch.zeros(num_queries, k + 1)
    class_logits[:, k] = 20.0
    mask_logits = torch.full((num_queries, *masks.shape[1:]), -20.0)
    for t, q in enumerate(queries.tolist()):
        class_logits[q] = 0.0
        class_logits[q, classes[t]] = 20.0
        mask_logits[q] = torch.where(masks[t], 20.0, -20.0)
    return class_logits, mask_logits


def _no_target() -> InstanceTarget:
    """A gRefCOCO no-target `<SEG>`: no mask, no class."""
    return InstanceTarget(masks=torch.zeros(0, SIZE, SIZE, dtype=torch.bool), classes=torch.zeros(0, dtype=torch.int64))


def _brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(cost[range(n), list(p)].sum() for p in itertools.permutations(range(m), n))
    return min(cost[list(p), range(m)].sum() for p in itertools.permutations(range(n), m))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5), (5, 1)])
def test_linear_sum_assignment_is_optimal(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        cost = rng.normal(size=shape)
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == len(cols) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert np.all(np.diff(rows) > 0)
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost))


def test_linear_sum_assignment_avoids_non_finite_costs() -> None:
    cost = np.array([[np.nan, 1.0, 5.0], [np.inf, 2.0, 1.0], [0.0, -np.inf, 3.0]])
    rows, cols = linear_sum_assignment(cost)
    assert cols.tolist() == [1, 2, 0]


def test_matcher_recovers_a_permutation() -> None:
    masks = _boxes(4)
    classes = torch.tensor([2, 0, 1, 2])
    queries = torch.tensor([5, 1, 3, 0])  # target t is predicted by query queries[t]
    class_logits, mask_logits = _perfect_logits(masks, classes, queries, num_queries=7, k=3)
    # Predictions at half the target resolution: points are in normalised coordinates.
    mask_logits = F.interpolate(mask_logits[None], size=(SIZE // 2, SIZE // 2), mode="bilinear")[0]
    matcher = HungarianMatcher(num_points=POINTS)
    query_idx, target_idx = matcher(class_logits, mask_logits, masks, classes, generator=_gen())
    assert query_idx.tolist() == sorted(queries.tolist())
    assert dict(zip(query_idx.tolist(), target_idx.tolist())) == {q: t for t, q in enumerate(queries.tolist())}


def test_matcher_without_targets_matches_nothing() -> None:
    target = _no_target()
    query_idx, target_idx = HungarianMatcher(num_points=POINTS)(
        torch.randn(5, 3), torch.randn(5, 8, 8), target.masks, target.classes
    )
    assert query_idx.numel() == target_idx.numel() == 0


def test_matcher_cost_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    masks, classes = _boxes(3), torch.tensor([0, 1, 1])
    class_logits, mask_logits = torch.randn(5, 3), torch.randn(5, SIZE, SIZE)
    args = (class_logits, mask_logits, masks, classes)

    def cost(c_class: float, c_mask: float, c_dice: float) -> torch.Tensor:
        matcher = HungarianMatcher(cost_class=c_class, cost_mask=c_mask, cost_dice=c_dice, num_points=POINTS)
        return matcher.cost_matrix(*args, generator=_gen())

    terms = [cost(1, 0, 0), cost(0, 1, 0), cost(0, 0, 1)]
    torch.testing.assert_close(terms[0], -class_logits.softmax(-1)[:, classes])
    for term in terms:
        assert term.abs().sum() > 0
    torch.testing.assert_close(cost(2, 5, 5), 2 * terms[0] + 5 * terms[1] + 5 * terms[2])
    torch.testing.assert_close(cost(3, 0.5, 7), 3 * terms[0] + 0.5 * terms[1] + 7 * terms[2])
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def test_matcher_ignores_points_in_the_ignore_region() -> None:
    torch.manual_seed(0)
    masks, classes = _boxes(2), torch.tensor([0, 1])
    class_logits, mask_logits = torch.randn(4, 3), torch.randn(4, SIZE, SIZE)
    ignore = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    ignore[:, SIZE // 2 :] = True
    # Change targets and predictions only inside the ignore region.
    masks_changed, logits_changed = masks.clone(), mask_logits.clone()
    masks_changed[:, ignore] = ~masks_changed[:, ignore]
    logits_changed[:, ignore] = 10 * torch.randn(4, int(ignore.sum()))
    matcher = HungarianMatcher(cost_class=0.0, num_points=POINTS)

    def cost(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
        return matcher.cost_matrix(class_logits, logits, target, classes, region, generator=_gen())

    torch.testing.assert_close(cost(mask_logits, masks, ignore), cost(logits_changed, masks_changed, ignore))
    assert not torch.allclose(cost(mask_logits, masks, None), cost(logits_changed, masks_changed, None))


def _instance(
    masks: torch.Tensor, classes: torch.Tensor, queries: torch.Tensor, num_queries: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, InstanceTarget]:
    class_logits, mask_logits = _perfect_logits(masks, classes, queries, num_queries, k)
    return class_logits, mask_logits, InstanceTarget(masks=masks, classes=classes)


def test_perfect_predictions_give_near_zero_losses() -> None:
    k, q = 3, 6
    a = _instance(_boxes(3), torch.tensor([0, 2, 1]), torch.tensor([4, 0, 2]), q, k)
    b = _instance(_boxes(2), torch.tensor([1, 1]), torch.tensor([1, 5]), q, k)
    layer = LayerPrediction(class_logits=torch.stack([a[0], b[0]]), mask_logits=torch.stack([a[1], b[1]]))
    noisy = LayerPrediction(class_logits=torch.randn(2, q, k + 1), mask_logits=torch.randn(2, q, SIZE, SIZE))
    targets = [a[2], b[2]]
    losses = SegCriterion(num_points=POINTS)([layer], targets, generator=_gen())
    noisy_losses = SegCriterion(num_points=POINTS)([noisy], targets, generator=_gen())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_seg"}
    assert losses["loss_ce"] < 1e-3
    # Bilinear sampling of a step gives soft labels on mask borders, and uncertainty sampling puts
    # most points there on purpose, so the residual is small but not 0; with uniform points it is ~0.
    assert losses["loss_mask"] < 0.2 and losses["loss_dice"] < 0.1
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        assert noisy_losses[name] > 5 * losses[name]
    uniform = SegCriterion(importance_sample_ratio=0.0, num_points=POINTS)([layer], targets, generator=_gen())
    assert uniform["loss_mask"] < 0.05 and uniform["loss_dice"] < 0.05


def test_uncertain_points_concentrate_on_mask_borders() -> None:
    logits = torch.where(_boxes(1)[0], 5.0, -5.0)[None]
    coords = uncertain_point_coords(logits, POINTS, 3.0, 0.75, generator=_gen())
    assert coords.shape == (1, POINTS, 2)
    sampled = sample_point(logits[:, None], coords, align_corners=False)[0, 0]
    on_border = sampled.abs() < 4.99
    # 75% of the points are the most uncertain of 3x candidates; the uniform 25% rarely hit a border.
    assert on_border[: int(0.75 * POINTS)].float().mean() > 0.1
    assert on_border[: int(0.75 * POINTS)].float().mean() > 3 * on_border[int(0.75 * POINTS) :].float().mean()


def test_no_target_instance_gives_only_ce_toward_background() -> None:
    torch.manual_seed(0)
    k, q = 2, 4
    class_logits = torch.randn(1, q, k + 1, requires_grad=True)
    mask_logits = torch.randn(1, q, 16, 16, requires_grad=True)
    target = _no_target()
    losses = SegCriterion(num_points=POINTS)(
        [LayerPrediction(class_logits=class_logits, mask_logits=mask_logits)], [target], generator=_gen()
    )
    # Every query's target is the background; its weight cancels in the weighted mean.
    expected = F.cross_entropy(class_logits[0], torch.full((q,), k))
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    torch.testing.assert_close(losses["loss_seg"], 2.0 * expected)
    losses["loss_seg"].backward()
    assert class_logits.grad is not None and class_logits.grad.abs().sum() > 0
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() == 0


def _log_softmax(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(x) for x in row))


@pytest.mark.parametrize("no_object_weight", [0.1, 1.0])
def test_background_weight_in_ce(no_object_weight: float) -> None:
    # One condition, two queries: query 0 predicts the target's mask, query 1 is unmatched (bg).
    masks = _boxes(1)
    rows = [[0.3, -0.2], [1.1, 0.4]]  # [Q=2, K+1=2]
    mask_logits = torch.stack([torch.where(masks[0], 20.0, -20.0), torch.full((SIZE, SIZE), -20.0)])
    layer = LayerPrediction(class_logits=torch.tensor([rows]), mask_logits=mask_logits[None])
    target = InstanceTarget(masks=masks, classes=torch.tensor([0]))
    criterion = SegCriterion(no_object_weight=no_object_weight, num_points=POINTS)
    losses = criterion([layer], [target], generator=_gen())
    nll_matched = -_log_softmax(rows[0], 0)
    nll_bg = -_log_softmax(rows[1], 1)
    expected = (1.0 * nll_matched + no_object_weight * nll_bg) / (1.0 + no_object_weight)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_number_of_conditions_may_change_between_calls() -> None:
    criterion = SegCriterion(num_points=POINTS)
    for k in (1, 4, 2):
        masks = _boxes(2)
        classes = torch.tensor([0, k - 1])
        class_logits, mask_logits = _perfect_logits(masks, classes, torch.tensor([0, 2]), 3, k)
        layer = LayerPrediction(class_logits=class_logits[None], mask_logits=mask_logits[None])
        losses = criterion([layer], [InstanceTarget(masks=masks, classes=classes)], generator=_gen())
        assert losses["loss_ce"] < 1e-3


def test_ignore_region_is_left_out_of_mask_losses() -> None:
    masks, classes = _boxes(2), torch.tensor([0, 1])
    ignore = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    ignore[SIZE // 2 :] = True
    class_logits, mask_logits = _perfect_logits(masks, classes, torch.tensor([0, 1]), 3, 2)
    layer = LayerPrediction(class_logits=class_logits[None], mask_logits=mask_logits[None])
    changed = masks.clone()
    changed[:, ignore] = ~changed[:, ignore]  # the targets differ only inside the ignore region
    criterion = SegCriterion(num_points=POINTS)

    def losses(target_masks: torch.Tensor, region: torch.Tensor | None) -> dict[str, torch.Tensor]:
        target = InstanceTarget(masks=target_masks, classes=classes, ignore=region)
        return criterion([layer], [target], generator=_gen())

    with_ignore, reference = losses(changed, ignore), losses(masks, ignore)
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        torch.testing.assert_close(with_ignore[name], reference[name])
    assert losses(changed, None)["loss_mask"] > 5 * losses(masks, None)["loss_mask"]


def test_gradients_reach_every_layer_and_keys_name_aux_layers() -> None:
    torch.manual_seed(0)
    k, q, num_layers = 3, 5, 3
    layers = [
        LayerPrediction(
            class_logits=torch.randn(2, q, k + 1, requires_grad=True),
            mask_logits=torch.randn(2, q, 16, 16, requires_grad=True),
        )
        for _ in range(num_layers)
    ]
    targets = [
        InstanceTarget(masks=_boxes(2), classes=torch.tensor([0, 2])),
        _no_target(),
    ]
    criterion = SegCriterion(num_points=POINTS)
    losses = criterion(layers, targets, generator=_gen())
    names = {f"{name}{suffix}" for name in ("loss_ce", "loss_mask", "loss_dice") for suffix in ("", "_0", "_1")}
    assert set(losses) == names | {"loss_seg"}
    expected = sum(
        2.0 * losses[f"loss_ce{s}"] + 5.0 * losses[f"loss_mask{s}"] + 5.0 * losses[f"loss_dice{s}"]
        for s in ("", "_0", "_1")
    )
    torch.testing.assert_close(losses["loss_seg"], expected)
    losses["loss_seg"].backward()
    for layer in layers:
        assert layer.class_logits.grad.abs().sum() > 0
        assert layer.mask_logits.grad[0].abs().sum() > 0
        assert layer.mask_logits.grad[1].abs().sum() == 0  # the no-target instance has no mask loss


def test_losses_are_deterministic_with_a_generator() -> None:
    torch.manual_seed(0)
    layer = LayerPrediction(class_logits=torch.randn(1, 6, 4), mask_logits=torch.randn(1, 6, 16, 16))
    targets = [InstanceTarget(masks=_boxes(3), classes=torch.tensor([0, 1, 2]))]
    criterion = SegCriterion(num_points=POINTS)
    first = criterion([layer], targets, generator=_gen(7))
    second = criterion([layer], targets, generator=_gen(7))
    other = criterion([layer], targets, generator=_gen(8))
    for name in first:
        assert torch.equal(first[name], second[name])
    assert not torch.equal(first["loss_mask"], other["loss_mask"])


def test_criterion_rejects_mismatched_inputs() -> None:
    layer = LayerPrediction(class_logits=torch.randn(2, 4, 3), mask_logits=torch.randn(2, 4, 8, 8))
    target = InstanceTarget(masks=_boxes(1), classes=torch.tensor([0]))
    criterion = SegCriterion(num_points=POINTS)
    with pytest.raises(ValueError, match="2 predicted instances but 1 targets"):
        criterion([layer], [target])
    with pytest.raises(ValueError, match="index the 2 conditions"):
        criterion([layer], [target, InstanceTarget(masks=_boxes(1), classes=torch.tensor([2]))])


def test_llm_loss_matches_a_hand_computed_value() -> None:
    rows = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [0.2, 0.1, 0.0], [3.0, 1.0, 1.0]]  # [L=4, V=3]
    logits = torch.tensor([rows], requires_grad=True)
    labels = torch.tensor([[-100, 2, -100, 0]])
    # Position t predicts labels[t + 1]: rows 0 -> 2 and 2 -> 0 are supervised, row 3 predicts nothing.
    expected = -(_log_softmax(rows[0], 2) + _log_softmax(rows[2], 0)) / 2
    loss = llm_loss(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 3].abs().sum() == 0
    assert llm_loss(logits, torch.full((1, 4), -100)).item() == 0.0
