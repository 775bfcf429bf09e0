"""The tiny Mask2Former decoder of the decoder and deformable-attention tests, and random pyramids for it."""

from __future__ import annotations

import torch
from transformers import Mask2FormerConfig

from xsam.model.decoder import decoder_config

HIDDEN = 32
NUM_QUERIES = 20
DECODER_LAYERS = 3
CHANNELS = (32, 64, 96)  # the connector pyramid's channels at strides 8, 16, 32


def tiny_config() -> Mask2FormerConfig:
    """Hidden 32, 4 heads (head_dim 8), 2 encoder layers, 3 decoder layers, 20 queries."""
    return decoder_config(
        feature_size=HIDDEN,
        mask_feature_size=HIDDEN,
        hidden_dim=HIDDEN,
        encoder_layers=2,
        encoder_feedforward_dim=64,
        decoder_layers=DECODER_LAYERS,
        dim_feedforward=64,
        num_attention_heads=4,
        num_queries=NUM_QUERIES,
    )


def pyramid(num_images: int, seg_size: tuple[int, int], *, seed: int = 0) -> list[torch.Tensor]:
    """Random NCHW maps with `CHANNELS` at strides 8, 16, 32 of a (height, width) SAM input."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_images, channels, seg_size[0] // stride, seg_size[1] // stride, generator=generator)
        for channels, stride in zip(CHANNELS, (8, 16, 32))
    ]
