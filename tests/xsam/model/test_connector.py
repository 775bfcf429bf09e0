"""Projectors and the conv connector (spec §3 "Encoders and projectors", §8 "SAM layers / connector")."""

from __future__ import annotations

import pytest
import torch

from xsam.model.connector import (
    MLPProjector,
    SegConnector,
    SegTokenProjector,
    pixel_shuffle,
    pixel_unshuffle_tokens,
)


def test_pixel_unshuffle_channel_order_follows_internvl() -> None:
    """Output channel k of cell (i, j) = input channel k mod C of pixel (2i + k // 2C, 2j + (k // C) mod 2)."""
    batch, height, width, channels = 2, 4, 6, 3
    x = torch.randn(batch, height, width, channels)
    y = pixel_shuffle(x, 0.5)
    assert y.shape == (batch, 2, 3, 4 * channels)
    for k in range(4 * channels):
        row, col, c = k // (2 * channels), (k // channels) % 2, k % channels
        torch.testing.assert_close(y[:, :, :, k], x[:, row::2, col::2, c], rtol=0, atol=0)


def test_pixel_shuffle_up_channel_order() -> None:
    """Input channel k of pixel (i, j) lands on (2i + (k // (C/4)) mod 2, 2j + k // (C/2)), channel k mod C/4."""
    x = torch.randn(1, 3, 2, 8)
    y = pixel_shuffle(x, 2.0)
    assert y.shape == (1, 6, 4, 2)
    for k in range(8):
        row, col, c = (k // 2) % 2, k // 4, k % 2
        torch.testing.assert_close(y[:, row::2, col::2, c], x[:, :, :, k], rtol=0, atol=0)


def test_pixel_unshuffle_tokens_row_major() -> None:
    x = torch.randn(1, 4, 4, 2)
    tokens = pixel_unshuffle_tokens(x, 0.5)
    assert tokens.shape == (1, 4, 8)
    torch.testing.assert_close(tokens.reshape(1, 2, 2, 8), pixel_shuffle(x, 0.5), rtol=0, atol=0)


def test_pixel_shuffle_rejects_odd_grid() -> None:
    with pytest.raises(ValueError, match="grid height 5"):
        pixel_shuffle(torch.zeros(1, 5, 4, 4), 0.5)


def test_paper_size_shapes_on_meta() -> None:
    """SAM-L at 1024 px: 64x64x1024 hidden states -> 512@128², 1024@64², 2048@32²; 1024 LLM tokens."""
    with torch.device("meta"):
        connector = SegConnector(in_channels=1024)
        projector = SegTokenProjector(in_channels=1024, llm_dim=3072)
        states = [torch.empty(2, 64, 64, 1024) for _ in range(3)]
        outputs = connector(states)
        tokens = projector(states[-1])
    assert connector.out_channels == (512, 1024, 2048)
    assert [tuple(o.shape) for o in outputs] == [(2, 512, 128, 128), (2, 1024, 64, 64), (2, 2048, 32, 32)]
    assert tokens.shape == (2, 1024, 3072)
    assert pixel_unshuffle_tokens(torch.empty(1, 64, 64, 1024, device="meta")).shape == (1, 1024, 4096)


def test_paper_size_parameter_count_by_hand() -> None:
    """X-SAM's connector convs have no bias (`ConnectorConfig(bias=False)`); LayerNorms have weight + bias."""
    with torch.device("meta"):
        connector = SegConnector(in_channels=1024)
        with_bias = SegConnector(in_channels=1024, bias=True)
    # per level: conv1x1 1024->512 + LN(512), conv3x3 512->512 + LN(512)
    shared = 1024 * 512 + 2 * 512 + 512 * 512 * 9 + 2 * 512
    # then conv1x1 512 -> 1024*s + LN(1024*s): 2048, 1024, 512 channels for s = 2, 1, 0.5
    last = sum(512 * c + 2 * c for c in (2048, 1024, 512))
    assert 3 * shared + last == 10_499_072
    assert sum(p.numel() for p in connector.parameters()) == 3 * shared + last
    biases = 3 * (512 + 512) + (2048 + 1024 + 512)
    assert sum(p.numel() for p in with_bias.parameters()) == 3 * shared + last + biases


def test_tiny_connector_shapes_and_backward() -> None:
    torch.manual_seed(0)
    connector = SegConnector(in_channels=32, hidden_dim=16, base_channels=32)
    states = [torch.randn(2, 8, 8, 32, requires_grad=True) for _ in range(3)]
    outputs = connector(states)
    assert [tuple(o.shape) for o in outputs] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    sum(o.square().mean() for o in outputs).backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(s.grad is not None for s in states)


def test_tiny_token_projector_backward() -> None:
    torch.manual_seed(0)
    projector = SegTokenProjector(in_channels=32, llm_dim=24)
    tokens = projector(torch.randn(2, 8, 8, 32))
    assert tokens.shape == (2, 16, 24)
    tokens.square().mean().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_mlp_projector_hidden_differs_from_out() -> None:
    """`llm_projector`: D_llm -> 256 -> 256."""
    projector = MLPProjector(in_dim=48, hidden_dim=256, out_dim=256)
    assert projector(torch.randn(2, 5, 48)).shape == (2, 5, 256)
    assert sum(p.numel() for p in projector.parameters()) == (48 * 256 + 256) + (256 * 256 + 256)


def test_connector_validation() -> None:
    with pytest.raises(ValueError, match="non-increasing"):
        SegConnector(in_channels=32, hidden_dim=16, base_channels=32, scale_factors=(0.5, 1.0, 2.0))
    with pytest.raises(ValueError, match="base_channels 30"):
        SegConnector(in_channels=32, hidden_dim=16, base_channels=30, scale_factors=(0.25,))
    connector = SegConnector(in_channels=32, hidden_dim=16, base_channels=32)
    with pytest.raises(ValueError, match="3 levels"):
        connector([torch.zeros(1, 8, 8, 32)])
