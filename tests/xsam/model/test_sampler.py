"""The `<region>` sampler (spec §3 "Visual prompts", §8 "Region sampler")."""

from __future__ import annotations

import pytest
import torch

from xsam.model.sampler import RegionSampler


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _box(size: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_shapes_max_and_avg() -> None:
    grid = torch.randn(2, 32, 32, 12)
    masks = torch.stack([_box(128, (0, 40), (0, 40)), _box(128, (60, 61), (60, 62)), _box(128, (10, 90), (5, 6))])
    sources = torch.tensor([0, 1, 0])
    assert RegionSampler()(grid, masks, sources, generator=_generator()).shape == (3, 1, 12)
    avg = RegionSampler(pool="avg", tokens_per_region=64)
    assert avg(grid, masks, sources, generator=_generator()).shape == (3, 64, 12)
    empty = RegionSampler()(grid, masks[:0], sources[:0])
    assert empty.shape == (0, 1, 12)


def test_max_token_is_max_over_the_region_cells() -> None:
    """Canvas = grid size: pixel centres hit cell centres, so sampled values are exact cell values."""
    torch.manual_seed(0)
    grid = torch.randn(2, 8, 8, 5)
    masks = torch.stack([_box(8, (0, 2), (0, 3)), _box(8, (5, 8), (4, 6))])
    tokens = RegionSampler()(grid, masks, torch.tensor([0, 0]), generator=_generator())
    for region in range(2):
        torch.testing.assert_close(tokens[region, 0], grid[0][masks[region]].amax(0))
    assert not torch.allclose(tokens[0], tokens[1])


def test_sources_select_the_batch_item() -> None:
    torch.manual_seed(0)
    grid = torch.randn(3, 8, 8, 5)
    mask = _box(8, (2, 4), (2, 5))
    masks = torch.stack([mask, mask, mask])
    tokens = RegionSampler()(grid, masks, torch.tensor([2, 0, 1]), generator=_generator())
    for region, source in enumerate([2, 0, 1]):
        torch.testing.assert_close(tokens[region, 0], grid[source][mask].amax(0))


def test_canvas_larger_than_grid_maps_by_pixel_centres() -> None:
    """Features encode grid position (x, y, -x, -y); the max token gives the region's extent in grid units."""
    h = 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xs, ys, -xs, -ys], dim=-1)[None]  # [1, 16, 16, 4]
    sampler = RegionSampler()

    def extent(rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        masks = _box(64, rows, cols)[None]
        return sampler(grid, masks, torch.tensor([0]), generator=_generator())[0, 0]

    def centre(pixel: int) -> float:  # canvas pixel index (S = 64) -> grid coordinate (h = 16)
        return (pixel + 0.5) / 4 - 0.5

    first = extent((8, 24), (8, 16))
    torch.testing.assert_close(first, torch.tensor([centre(15), centre(23), -centre(8), -centre(8)]))
    second = extent((30, 50), (40, 60))
    torch.testing.assert_close(second, torch.tensor([centre(59), centre(49), -centre(40), -centre(30)]))


def test_avg_pools_groups_of_four_sampled_points() -> None:
    torch.manual_seed(0)
    grid = torch.randn(1, 8, 8, 3)
    masks = torch.stack([_box(8, (0, 4), (0, 8)), _box(8, (6, 7), (1, 2))])
    sampler = RegionSampler(pool="avg", tokens_per_region=64)
    tokens = sampler(grid, masks, torch.tensor([0, 0]), generator=_generator(3))
    points = sampler.sample_points(masks, generator=_generator(3))  # same draws as the forward
    values = grid[0][points[..., 0], points[..., 1]]  # [R, 256, D]
    torch.testing.assert_close(tokens, values.reshape(2, 64, 4, 3).mean(2))
    torch.testing.assert_close(tokens[1], grid[0, 6, 1].expand(64, 3))


def test_points_stay_in_the_mask() -> None:
    sampler = RegionSampler(num_points=256)
    big = _box(32, (0, 32), (0, 16))  # 512 pixels: drawn without replacement
    small = _box(32, (3, 5), (7, 9))  # 4 pixels: drawn with replacement
    points = sampler.sample_points(torch.stack([big, small]), generator=_generator())
    assert points.shape == (2, 256, 2)
    for region, mask in enumerate([big, small]):
        assert mask[points[region, :, 0], points[region, :, 1]].all()
    assert len({tuple(p) for p in points[0].tolist()}) == 256
    assert len({tuple(p) for p in points[1].tolist()}) == 4


def test_empty_mask_samples_the_whole_canvas() -> None:
    sampler = RegionSampler()
    points = sampler.sample_points(torch.zeros(1, 32, 32, dtype=torch.bool), generator=_generator())
    assert points.min() >= 0 and points.max() < 32
    assert points[0, :, 0].unique().numel() > 16 and points[0, :, 1].unique().numel() > 16


def test_generator_makes_draws_reproducible() -> None:
    grid = torch.randn(1, 8, 8, 4)
    masks = _box(32, (0, 20), (0, 20))[None]
    sampler = RegionSampler(pool="avg", tokens_per_region=64)
    first = sampler(grid, masks, torch.tensor([0]), generator=_generator(7))
    torch.testing.assert_close(first, sampler(grid, masks, torch.tensor([0]), generator=_generator(7)))
    assert not torch.allclose(first, sampler(grid, masks, torch.tensor([0]), generator=_generator(8)))


@pytest.mark.parametrize("pool, tokens", [("max", 1), ("avg", 64)])
def test_gradients_reach_only_the_region_cells(pool: str, tokens: int) -> None:
    grid = torch.randn(2, 8, 8, 4, requires_grad=True)
    masks = torch.stack([_box(8, (1, 3), (1, 4)), _box(8, (5, 7), (5, 8))])
    sources = torch.tensor([0, 1])
    RegionSampler(pool=pool, tokens_per_region=tokens)(grid, masks, sources, generator=_generator()).sum().backward()
    assert grid.grad is not None
    for source in range(2):
        inside = grid.grad[source][masks[source]]
        outside = grid.grad[source][~masks[source]]
        assert inside.abs().sum() > 0
        assert outside.abs().sum() == 0


def test_validation() -> None:
    grid = torch.zeros(1, 8, 8, 4)
    with pytest.raises(ValueError, match="bool"):
        RegionSampler()(grid, torch.zeros(1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        RegionSampler()(grid, torch.ones(1, 8, 8, dtype=torch.bool), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple"):
        RegionSampler(num_points=256, tokens_per_region=3)
    with pytest.raises(ValueError, match="pool"):
        RegionSampler(pool="sum")  # type: ignore[arg-type]
