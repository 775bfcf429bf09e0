"""The `<region>` sampler of X-SAM's intseg/vgdseg visual prompts (spec §3 "Visual prompts", §8 row
"Region sampler"; upstream `xsam/xsam/model/modules/sampler/modeling_sampler.py::NaiveSamplerModel`).

Per prompt mask: draw `num_points` random foreground pixels, bilinearly sample the `seg_projector`
grid (32x32xD_llm for a 1024 px SAM input) at them, and pool the point features into the tokens
that replace `<region>` in the LLM input. Paper branch (the default): max over all 256 points, 1
token per region. Main branch: `pool="avg"`, `tokens_per_region=64` (AvgPool1d, kernel 4).

Differences from upstream, on purpose:
- Coordinates are pixel centres, (index + 0.5) / S, sampled with `align_corners=False` and border
  padding, so canvas pixel centres land on the same physical spot of the grid. Upstream divides the
  integer index by S and samples with `align_corners=True`, which shifts points by up to one grid
  cell toward the top-left at the far edge.
- An empty prompt mask (upstream prints "error" and fails) samples points uniformly over the whole
  canvas, so the region token is an image-level summary instead of a crash.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RegionSampler(nn.Module):
    """Pool grid features inside each prompt mask into `tokens_per_region` tokens. No parameters.

    Args:
        num_points: foreground pixels drawn per region (256 in X-SAM). Drawn without replacement
            when the mask has at least that many pixels, with replacement otherwise.
        pool: "max" (paper branch, AdaptiveMaxPool1d(1)) or "avg" (main branch, AvgPool1d).
        tokens_per_region: output tokens per region; the pooling kernel is
            `num_points // tokens_per_region` (paper: 1 token; main: 64 tokens, kernel 4).
    """

    def __init__(
        self,
        *,
        num_points: int = 256,
        pool: Literal["max", "avg"] = "max",
        tokens_per_region: int = 1,
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' (paper branch) or 'avg' (main branch), got {pool!r}")
        if num_points <= 0 or tokens_per_region <= 0 or num_points % tokens_per_region:
            raise ValueError(
                f"num_points ({num_points}) must be a positive multiple of tokens_per_region ({tokens_per_region})"
            )
        self.num_points = num_points
        self.pool = pool
        self.tokens_per_region = tokens_per_region

    def sample_points(self, masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixel (row, col) indices [R, num_points, 2] drawn from each mask [R, S, S] (see class doc)."""
        device = generator.device if generator is not None else masks.device
        size = masks.shape[-2:]
        points = []
        for mask in masks:
            foreground = mask.nonzero().to(device)
            count = foreground.shape[0]
            if count == 0:
                rows = torch.randint(size[0], (self.num_points,), generator=generator, device=device)
                cols = torch.randint(size[1], (self.num_points,), generator=generator, device=device)
                points.append(torch.stack([rows, cols], dim=-1))
                continue
            if count >= self.num_points:
                index = torch.randperm(count, generator=generator, device=device)[: self.num_points]
            else:
                index = torch.randint(count, (self.num_points,), generator=generator, device=device)
            points.append(foreground[index])
        return torch.stack(points).to(masks.device)

    def forward(
        self,
        grid: Tensor,
        masks: Tensor,
        sources: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Region tokens [R, tokens_per_region, D].

        Args:
            grid: `seg_projector` features as a grid [B, h, w, D].
            masks: bool prompt masks [R, S, S] on the SAM canvas (any S; points are mapped by
                relative position, so S need not be a multiple of h).
            sources: [R] index of the batch item whose grid each region pools; VGD negatives
                point at other items of the batch (spec §8 "VGD training categories").
            generator: source of the random points, for reproducible runs and tests.
        """
        if grid.ndim != 4:
            raise ValueError(f"grid must be [B, h, w, D], got shape {tuple(grid.shape)}")
        if masks.ndim != 3 or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [R, S, S], got {masks.dtype} {tuple(masks.shape)}")
        if sources.shape != masks.shape[:1]:
            raise ValueError(f"sources {tuple(sources.shape)} must hold one batch index per mask ({masks.shape[0]})")
        if masks.shape[0] == 0:
            return grid.new_zeros((0, self.tokens_per_region, grid.shape[-1]))
        if int(sources.min()) < 0 or int(sources.max()) >= grid.shape[0]:
            raise ValueError(f"sources {sources.tolist()} out of range for a batch of {grid.shape[0]} grids")

        points = self.sample_points(masks, generator)
        canvas = torch.tensor(masks.shape[-2:], device=grid.device, dtype=torch.float32)
        # (row, col) pixel centres -> grid_sample's (x, y) in [-1, 1]; float32 first: bf16 cannot
        # hold pixel indices near 1024 exactly
        coords = ((points.to(grid.device, torch.float32) + 0.5) / canvas * 2 - 1).flip(-1).to(grid.dtype)

        feature_map = grid.permute(0, 3, 1, 2)  # [B, D, h, w]
        order = []
        sampled = []
        # one grid_sample per source image, instead of copying the grid once per region
        for source in sources.unique().tolist():
            regions = (sources == source).nonzero().squeeze(1)
            values = F.grid_sample(
                feature_map[source : source + 1],
                coords[regions].unsqueeze(0),  # [1, R_b, P, 2]
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )  # [1, D, R_b, P]
            sampled.append(values[0].permute(1, 0, 2))  # [R_b, D, P]
            order.append(regions)
        features = torch.cat(sampled)[torch.cat(order).argsort()]  # [R, D, P], in region order

        kernel = self.num_points // self.tokens_per_region
        pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
        return pool(features, kernel_size=kernel).transpose(1, 2)  # [R, T, D]
