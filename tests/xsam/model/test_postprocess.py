"""Post-processing (spec §6): hand-built predictions whose answer is known, and naive full-restore references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from xsam.data.transforms import Geometry
from xsam.model.postprocess import (
    Segment,
    class_probs,
    generalized_referring,
    grounded,
    instance,
    interactive,
    panoptic,
    referring,
    semantic,
)

LOW = 4  # decoder resolution of the hand-built examples: [Q, 4, 4]
ON, OFF = 10.0, -10.0  # mask logits: sigmoid ~ 1 / ~ 0


def upsample(logits: torch.Tensor) -> torch.Tensor:
    """Exact restore for hand-built examples: each low-res pixel becomes a 2×3 block ([n, 4, 4] -> [n, 8, 12])."""
    return logits.repeat_interleave(2, dim=-2).repeat_interleave(3, dim=-1)


def bilinear(logits: torch.Tensor, size: tuple[int, int] = (13, 17)) -> torch.Tensor:
    """A Geometry.restore-like resize for random examples (non-square, not a multiple of the input)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, *size)
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class CountingRestore:
    """Wraps a restore function and records how many rows each call received."""

    def __init__(self, restore=upsample) -> None:
        self.restore = restore
        self.rows: list[int] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.rows.append(int(logits.shape[0]))
        return self.restore(logits)


def class_logits_for(
    labels: list[int | None], num_conditions: int, strength: list[float] | None = None
) -> torch.Tensor:
    """[Q, K+1]: query q predicts labels[q] (None = background) with logit strength[q] (default 10), 0 elsewhere."""
    out = torch.zeros(len(labels), num_conditions + 1)
    for q, label in enumerate(labels):
        out[q, num_conditions if label is None else label] = 10.0 if strength is None else strength[q]
    return out


def region(*, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    """[LOW, LOW] mask logits: ON inside rows×cols, OFF elsewhere."""
    out = torch.full((LOW, LOW), OFF)
    out[rows, cols] = ON
    return out


def random_predictions(seed: int, num_queries: int = 12, num_conditions: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random classes (some queries predict background) and noisy, mostly disjoint 6×6 masks: each low-res pixel
    belongs to one random query, so segments survive the overlap rule and some still compete at the borders."""
    gen = torch.Generator().manual_seed(seed)
    class_logits = 3.0 * torch.randn(num_queries, num_conditions + 1, generator=gen)
    owner = torch.randint(num_queries, (6, 6), generator=gen)
    own = owner[None] == torch.arange(num_queries)[:, None, None]
    mask_logits = torch.where(own, 3.0, -3.0) + 1.5 * torch.randn(num_queries, 6, 6, generator=gen)
    return class_logits, mask_logits


# -- naive references: restore every query at once, then the textbook loops -----------------------------------------


def naive_panoptic(class_logits, mask_logits, restore, is_thing, threshold=0.0, overlap=0.8, mask_threshold=0.5):
    num_conditions = class_logits.shape[1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = (labels != num_conditions) & (scores > threshold)
    sigmoid = restore(mask_logits).sigmoid()[keep]
    scores, labels = scores[keep], labels[keep]
    segmentation = torch.zeros(sigmoid.shape[1:], dtype=torch.int32)
    segments: list[Segment] = []
    if len(scores) == 0:
        return segmentation, segments
    owner = (scores[:, None, None] * sigmoid).argmax(0)
    stuff: dict[int, Segment] = {}
    for k in range(len(scores)):
        label = int(labels[k])
        assigned = int((owner == k).sum())
        original = int((sigmoid[k] > mask_threshold).sum())
        painted = (owner == k) & (sigmoid[k] > mask_threshold)
        if assigned == 0 or original == 0 or int(painted.sum()) == 0 or assigned / original < overlap:
            continue
        if not is_thing[label] and label in stuff:
            segmentation[painted] = stuff[label].id
            stuff[label].area += int(painted.sum())
            stuff[label].score = max(stuff[label].score, float(scores[k]))
            continue
        segment = Segment(
            id=len(segments) + 1, label=label, is_thing=is_thing[label], score=float(scores[k]), area=int(painted.sum())
        )
        segments.append(segment)
        segmentation[painted] = segment.id
        if not is_thing[label]:
            stuff[label] = segment
    return segmentation, segments


def naive_semantic(class_logits, mask_logits, restore):
    probs = class_logits.softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, restore(mask_logits).sigmoid()).argmax(0)


def naive_instance(class_logits, mask_logits, restore, is_thing=None, top_k=None, threshold=0.0):
    """(query, label, score, mask) tuples; top-k by probability with ties to the lower flattened index."""
    probs = class_logits.softmax(-1)[:, :-1]
    num_queries, num_conditions = probs.shape
    pairs = sorted(
        ((float(probs[q, c]), q, c) for q in range(num_queries) for c in range(num_conditions)),
        key=lambda item: (-item[0], item[1] * num_conditions + item[2]),
    )[: num_queries if top_k is None else top_k]
    sigmoid = restore(mask_logits).sigmoid()
    out = []
    for prob, q, c in pairs:
        if prob == 0 or (is_thing is not None and not is_thing[c]):
            continue
        inside = sigmoid[q] > 0.5
        mean = float(sigmoid[q][inside].mean()) if inside.any() else 0.0
        if prob * mean >= threshold:
            out.append((q, c, prob * mean, inside))
    return out


# -- class_probs ---------------------------------------------------------------------------------------------------


def test_class_probs_is_softmax_over_all_columns_without_background():
    logits = torch.tensor([[1.0, 2.0, -1e9, 3.0], [0.0, 0.0, -1e9, 0.0]])
    probs = class_probs(logits)
    expected = torch.softmax(logits, dim=-1)[:, :3]
    assert probs.shape == (2, 3)
    assert torch.allclose(probs, expected)
    assert probs[:, 2].eq(0).all()  # padded condition
    # Row 2: two conditions and the background share the mass (1/3 each); dropping bg does not renormalise.
    assert probs[1].tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])


# -- panoptic ------------------------------------------------------------------------------------------------------


def test_panoptic_two_halves_give_two_segments_with_their_labels_and_areas():
    class_logits = class_logits_for([0, 1, None], num_conditions=2)
    mask_logits = torch.stack([region(cols=slice(0, 2)), region(cols=slice(2, 4)), region()])
    result = panoptic(class_logits, mask_logits, upsample, is_thing=[True, False])
    prob = math.exp(10) / (math.exp(10) + 2)
    assert [(s.id, s.label, s.is_thing, s.area) for s in result.segments] == [(1, 0, True, 48), (2, 1, False, 48)]
    assert [s.score for s in result.segments] == pytest.approx([prob, prob])
    assert result.segmentation.dtype == torch.int32 and result.segmentation.shape == (8, 12)
    assert result.segmentation[:, :6].eq(1).all() and result.segmentation[:, 6:].eq(2).all()


def test_panoptic_merges_stuff_per_label_but_keeps_things_apart():
    # Queries 0-1: the same stuff label on the top / bottom left; queries 2-3: the same thing label on the right.
    class_logits = class_logits_for([1, 1, 0, 0], num_conditions=2, strength=[10.0, 8.0, 10.0, 10.0])
    mask_logits = torch.stack(
        [
            region(rows=slice(0, 2), cols=slice(0, 2)),
            region(rows=slice(2, 4), cols=slice(0, 2)),
            region(rows=slice(0, 2), cols=slice(2, 4)),
            region(rows=slice(2, 4), cols=slice(2, 4)),
        ]
    )
    result = panoptic(class_logits, mask_logits, upsample, is_thing=[True, False])
    assert [(s.id, s.label, s.is_thing, s.area) for s in result.segments] == [
        (1, 1, False, 48),
        (2, 0, True, 24),
        (3, 0, True, 24),
    ]
    assert result.segments[0].score == pytest.approx(math.exp(10) / (math.exp(10) + 2))  # the better of the two
    assert result.segmentation[:, :6].eq(1).all()
    assert result.segmentation[:4, 6:].eq(2).all() and result.segmentation[4:, 6:].eq(3).all()


@pytest.mark.parametrize("overlap_threshold, kept", [(0.8, False), (0.3, True)])
def test_panoptic_overlap_rule_drops_a_mostly_occluded_query(overlap_threshold, kept):
    # Query 0 (more confident) covers columns 0-2; query 1 covers columns 1-3 and keeps only column 3: 1/3 of it.
    class_logits = class_logits_for([0, 1], num_conditions=2, strength=[10.0, 8.0])
    mask_logits = torch.stack([region(cols=slice(0, 3)), region(cols=slice(1, 4))])
    result = panoptic(class_logits, mask_logits, upsample, is_thing=[True, True], overlap_threshold=overlap_threshold)
    assert result.segmentation[:, :9].eq(1).all()
    if kept:
        assert [(s.label, s.area) for s in result.segments] == [(0, 72), (1, 24)]
        assert result.segmentation[:, 9:].eq(2).all()
    else:
        assert [(s.label, s.area) for s in result.segments] == [(0, 72)]
        assert result.segmentation[:, 9:].eq(0).all()  # the dropped query's pixels are void


def test_panoptic_drops_background_and_low_score_queries_without_restoring_them():
    class_logits = class_logits_for([None, 0, None], num_conditions=1, strength=[10.0, 1.0, 10.0])
    mask_logits = torch.stack([region(), region(), region()])
    restore = CountingRestore()
    kept = panoptic(class_logits, mask_logits, restore, is_thing=[True])
    assert [s.label for s in kept.segments] == [0] and restore.rows == [1]
    restore.rows.clear()
    score = float(class_probs(class_logits)[1, 0])
    dropped = panoptic(class_logits, mask_logits, restore, is_thing=[True], threshold=score)  # strict >
    assert dropped.segments == [] and dropped.segmentation.shape == (8, 12) and dropped.segmentation.eq(0).all()
    assert restore.rows == [0]  # only asked for the output size


def test_panoptic_paints_only_where_the_winning_query_is_above_the_mask_threshold():
    # One query owns every pixel (nothing competes) but is confident only on the left half.
    mask = torch.full((LOW, LOW), -1.0)
    mask[:, :2] = ON
    result = panoptic(class_logits_for([0], 1), mask[None], upsample, is_thing=[True])
    assert [s.area for s in result.segments] == [48]  # assigned 96 >= 0.8 * original 48, painted 48
    assert result.segmentation[:, :6].eq(1).all() and result.segmentation[:, 6:].eq(0).all()


@pytest.mark.parametrize("chunk_size", [1, 16])
def test_panoptic_ties_go_to_the_first_query_across_chunks(chunk_size):
    # Two equally confident queries with identical masks: a single arg-max gives every pixel to query 0.
    class_logits = class_logits_for([0, 1], num_conditions=2)
    mask_logits = torch.stack([region(), region()])
    result = panoptic(class_logits, mask_logits, upsample, is_thing=[True, True], chunk_size=chunk_size)
    assert [(s.label, s.area) for s in result.segments] == [(0, 96)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_matches_a_naive_full_restore_reference(seed):
    class_logits, mask_logits = random_predictions(seed)
    is_thing = [True, False, True, False, False]
    segmentation, segments = naive_panoptic(class_logits, mask_logits, bilinear, is_thing)
    assert len(segments) >= 2  # the example exercises the loop
    for chunk_size in (1, 3, 100):
        result = panoptic(class_logits, mask_logits, bilinear, is_thing=is_thing, chunk_size=chunk_size)
        assert torch.equal(result.segmentation, segmentation)
        assert [(s.id, s.label, s.is_thing, s.area) for s in result.segments] == [
            (s.id, s.label, s.is_thing, s.area) for s in segments
        ]
        assert [s.score for s in result.segments] == pytest.approx([s.score for s in segments])


# -- semantic ------------------------------------------------------------------------------------------------------


def test_semantic_hand_example():
    # Condition 2 is padding: it never wins even where no query is confident.
    class_logits = class_logits_for([0, 1], num_conditions=3)
    class_logits[:, 2] = -1e9
    mask_logits = torch.stack([region(cols=slice(0, 1)), region(cols=slice(1, 4))])
    seg = semantic(class_logits, mask_logits, upsample)
    assert seg.dtype == torch.int64 and seg.shape == (8, 12)
    assert seg[:, :3].eq(0).all() and seg[:, 3:].eq(1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_semantic_matches_a_naive_full_restore_reference_for_any_chunk_size(seed):
    class_logits, mask_logits = random_predictions(seed)
    expected = naive_semantic(class_logits, mask_logits, bilinear)
    assert expected.unique().numel() >= 2
    for chunk_size in (1, 5, 100):
        assert torch.equal(semantic(class_logits, mask_logits, bilinear, chunk_size=chunk_size), expected)


# -- instance ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_instance_scores_are_prob_times_mean_sigmoid_inside_sorted_descending(seed):
    class_logits, mask_logits = random_predictions(seed)
    expected = sorted(naive_instance(class_logits, mask_logits, bilinear), key=lambda item: -item[2])
    for chunk_size in (1, 100):
        result = instance(class_logits, mask_logits, bilinear, chunk_size=chunk_size)
        assert len(result.scores) == len(expected) == 12  # top-k = Q pairs
        assert result.scores.tolist() == pytest.approx([item[2] for item in expected])
        assert torch.all(result.scores[:-1] >= result.scores[1:])
        assert result.labels.tolist() == [item[1] for item in expected]
        assert torch.equal(result.masks, torch.stack([item[3] for item in expected]))


def test_instance_keeps_thing_classes_top_k_and_threshold():
    class_logits, mask_logits = random_predictions(3)
    is_thing = [True, False, True, False, True]
    restore = CountingRestore(bilinear)
    things = instance(class_logits, mask_logits, restore, is_thing=is_thing)
    expected = naive_instance(class_logits, mask_logits, bilinear, is_thing=is_thing)
    assert sorted(things.labels.tolist()) == sorted(item[1] for item in expected)
    assert set(things.labels.tolist()) <= {0, 2, 4} and len(things.labels) > 0
    assert sum(restore.rows) == len({item[0] for item in expected})  # each kept query restored once
    top = instance(class_logits, mask_logits, bilinear, top_k=3)
    assert len(top.labels) == 3
    cut = float(things.scores[2])
    above = instance(class_logits, mask_logits, bilinear, is_thing=is_thing, threshold=cut)
    assert torch.equal(above.scores, things.scores[things.scores >= cut])


def test_instance_never_returns_padded_conditions():
    class_logits = class_logits_for([0, 0], num_conditions=3)
    class_logits[:, 1:3] = -1e9  # conditions 1 and 2 are padding
    mask_logits = torch.stack([region(cols=slice(0, 2)), region(cols=slice(2, 4))])
    result = instance(class_logits, mask_logits, upsample, top_k=6)
    assert result.labels.tolist() == [0, 0]
    assert result.scores.tolist() == pytest.approx([1 / (1 + math.exp(-10)) * 1 / (1 + math.exp(-10))] * 2)


def test_instance_with_nothing_kept_is_empty_at_the_output_size():
    result = instance(class_logits_for([1], 2), region()[None], upsample, is_thing=[True, False])
    assert result.masks.shape == (0, 8, 12) and result.labels.shape == (0,) and result.scores.shape == (0,)


# -- referring, generalized, grounded, interactive -----------------------------------------------------------------


def test_referring_picks_the_best_query_for_its_own_condition():
    # Query 1 is the most confident overall, but for condition 1; query 0 is the best for condition 0.
    class_logits = class_logits_for([0, 1, None], num_conditions=2, strength=[4.0, 12.0, 10.0])
    mask_logits = torch.stack([region(cols=slice(0, 1)), region(cols=slice(3, 4)), region()])
    restore = CountingRestore()
    result = referring(class_logits, mask_logits, restore, condition=0)
    probs = class_probs(class_logits)
    assert result.query == 0 and result.score == pytest.approx(float(probs[0, 0]))
    assert result.mask.shape == (8, 12) and result.mask[:, :3].all() and not result.mask[:, 3:].any()
    assert restore.rows == [1]
    assert referring(class_logits, mask_logits, upsample, condition=1).query == 1


def _single_condition_logits(probs: list[float]) -> torch.Tensor:
    """[Q, 2] logits whose condition probability is exactly probs[q]."""
    p = torch.tensor(probs)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_generalized_referring_ors_every_confident_query():
    class_logits = _single_condition_logits([0.9, 0.7, 0.3, 0.6])
    mask_logits = torch.stack(
        [region(cols=slice(0, 1)), region(cols=slice(1, 2)), region(cols=slice(2, 3)), region(rows=slice(0, 1))]
    )
    restore = CountingRestore()
    result = generalized_referring(class_logits, mask_logits, restore, chunk_size=2)
    assert result.queries == [0, 1, 3] and result.query == 0 and not result.empty
    assert result.score == pytest.approx((0.9 + 0.7 + 0.6) / 3)
    expected = upsample(torch.stack([mask_logits[0], mask_logits[1], mask_logits[3]])).gt(0).any(0)
    assert torch.equal(result.mask, expected)
    assert restore.rows == [2, 1]


def test_generalized_referring_keeps_the_argmax_and_reports_an_empty_mask():
    class_logits = _single_condition_logits([0.2, 0.5, 0.1])
    mask_logits = torch.stack([region(cols=slice(0, 1)), torch.full((LOW, LOW), OFF), region()])
    result = generalized_referring(class_logits, mask_logits, upsample)
    assert result.queries == [1] and result.query == 1 and result.score == pytest.approx(0.5)
    assert result.empty and not result.mask.any()


def test_grounded_gives_each_phrase_its_best_query_and_restores_each_query_once():
    # Conditions 0 and 1 are phrases, condition 2 is padding. Phrase 0 -> query 2, phrase 1 -> query 0.
    class_logits = class_logits_for([1, None, 0], num_conditions=3)
    class_logits[:, 2] = -1e9
    mask_logits = torch.stack([region(cols=slice(0, 1)), region(), region(cols=slice(3, 4))])
    restore = CountingRestore()
    results = grounded(class_logits, mask_logits, restore, num_phrases=2)
    probs = class_probs(class_logits)
    assert [r.query for r in results] == [2, 0]
    assert [r.score for r in results] == pytest.approx([float(probs[2, 0]), float(probs[0, 1])])
    assert results[0].mask[:, 9:].all() and not results[0].mask[:, :9].any()
    assert results[1].mask[:, :3].all() and not results[1].mask[:, 3:].any()
    assert sorted(restore.rows) == [2]
    # Two phrases won by the same query: restored once.
    restore.rows.clear()
    both = torch.tensor([[0.0, 0.0, -1e9, 10.0], [0.0, 0.0, -1e9, 10.0], [10.0, 10.0, -1e9, 0.0]])
    same = grounded(both, mask_logits, restore, num_phrases=2)
    assert [r.query for r in same] == [2, 2] and restore.rows == [1]
    assert grounded(class_logits, mask_logits, restore, num_phrases=0) == []


def test_interactive_returns_the_confident_query_that_overlaps_the_prompt():
    # Query 0: left half, most confident. Query 1: top-right corner, confident. Query 2: top-right, not confident.
    class_logits = _single_condition_logits([0.95, 0.8, 0.3])
    mask_logits = torch.stack(
        [
            region(cols=slice(0, 2)),
            region(rows=slice(0, 2), cols=slice(2, 4)),
            region(rows=slice(0, 1), cols=slice(3, 4)),
        ]
    )
    prompt = torch.zeros(8, 12, dtype=torch.bool)
    prompt[0:3, 9:12] = True
    for match in ("box", "mask"):
        result = interactive(class_logits, mask_logits, upsample, prompt_mask=prompt, match=match)
        assert result.query == 1, match
        assert result.mask[:4, 6:].all() and result.mask.sum() == 24
        assert result.score == pytest.approx(0.8 / (1 + math.exp(-10)))
    # With query 1 below the threshold, only the best-scoring query is a candidate.
    strict = interactive(class_logits, mask_logits, upsample, prompt_mask=prompt, threshold=0.9)
    assert strict.query == 0


# -- chunking, memory bound, output size, validation -------------------------------------------------------------


def test_restore_never_sees_more_than_chunk_size_rows():
    class_logits, mask_logits = random_predictions(4, num_queries=10)
    restore = CountingRestore(bilinear)
    semantic(class_logits, mask_logits, restore, chunk_size=4)
    assert restore.rows == [4, 4, 2]
    restore.rows.clear()
    panoptic(class_logits, mask_logits, restore, is_thing=[True] * 5, chunk_size=3)
    kept = int((class_logits.softmax(-1).argmax(-1) != 5).sum())
    assert sum(restore.rows) == kept and max(restore.rows) <= 3


def test_chunk_size_does_not_change_grounded_or_generalized_results():
    class_logits, mask_logits = random_predictions(5)
    class_logits[:, 0] += 4.0  # several confident queries for condition 0
    small = generalized_referring(class_logits, mask_logits, bilinear, chunk_size=1, score_threshold=0.3)
    large = generalized_referring(class_logits, mask_logits, bilinear, chunk_size=100, score_threshold=0.3)
    assert len(small.queries) >= 2 and small.queries == large.queries and torch.equal(small.mask, large.mask)
    one = grounded(class_logits, mask_logits, bilinear, num_phrases=5, chunk_size=1)
    many = grounded(class_logits, mask_logits, bilinear, num_phrases=5, chunk_size=100)
    assert [r.query for r in one] == [r.query for r in many]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(one, many))


def test_outputs_are_at_the_original_size_with_geometry_restore():
    # A 30×40 image on a 64-pixel canvas (resized to 48×64, padded below); predictions at 16×16.
    geometry = Geometry((30, 40), 1.6, (0, 0, 48, 64), (48, 64), 64)
    class_logits, mask_logits = random_predictions(6)
    mask_logits = F.interpolate(mask_logits[:, None], size=(16, 16), mode="bilinear")[:, 0]
    assert panoptic(class_logits, mask_logits, geometry.restore, is_thing=[True] * 5).segmentation.shape == (30, 40)
    assert semantic(class_logits, mask_logits, geometry.restore).shape == (30, 40)
    assert instance(class_logits, mask_logits, geometry.restore).masks.shape[1:] == (30, 40)
    assert referring(class_logits, mask_logits, geometry.restore).mask.shape == (30, 40)
    nothing = panoptic(class_logits_for([None], 1), mask_logits[:1], geometry.restore, is_thing=[True])
    assert nothing.segmentation.shape == (30, 40)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, m: panoptic(c, m, upsample, is_thing=[True]), "is_thing has 1 entries"),
        (lambda c, m: panoptic(c[None], m, upsample, is_thing=[True, True]), "class_logits must be"),
        (lambda c, m: semantic(c, m[:1], upsample), "same number of queries"),
        (lambda c, m: semantic(c, m[0], upsample), "mask_logits must be"),
        (lambda c, m: referring(c, m, upsample, condition=2), "condition=2 is out of range"),
        (lambda c, m: generalized_referring(c, m, upsample, condition=-1), "condition=-1 is out of range"),
        (lambda c, m: grounded(c, m, upsample, num_phrases=3), "num_phrases=3"),
        (lambda c, m: instance(c, m, upsample, top_k=0), "top_k must be"),
        (lambda c, m: instance(c, m, upsample, chunk_size=0), "chunk_size must be"),
        (lambda c, m: semantic(c, m, lambda x: x[:, 0]), "restore must map"),
        (
            lambda c, m: interactive(c, m, upsample, prompt_mask=torch.zeros(8, 12, dtype=torch.bool)),
            "prompt_mask must be",
        ),
        (
            lambda c, m: interactive(c, m, upsample, prompt_mask=torch.ones(5, 5, dtype=torch.bool)),
            "at the original image size",
        ),
    ],
)
def test_bad_inputs_raise_a_value_error_naming_the_argument(call, message):
    class_logits = class_logits_for([0, 1], num_conditions=2)
    mask_logits = torch.stack([region(), region()])
    with pytest.raises(ValueError, match=message):
        call(class_logits, mask_logits)
