"""Projectors and the SAM -> decoder connector of X-SAM (spec §3 "Encoders and projectors", §8 rows
"SAM layers / connector" and "seg_projector").

- `MLPProjector`: the 2-layer MLP X-SAM uses three times: `visual_projector` (SigLIP 1152 -> D_llm
  -> D_llm), `seg_projector` (4096 -> D_llm -> D_llm) and `llm_projector` (D_llm -> 256 -> 256).
- `SegTokenProjector`: the dual-encoder path, SAM's penultimate hidden state (64x64x1024 for SAM-L
  at 1024 px) pixel-unshuffled by 0.5 to 32x32x4096, then `seg_projector`: 1024 LLM tokens.
- `SegConnector`: X-SAM's "conv" connector (`xsam/xsam/model/modules/connector/modeling_connector.py`,
  `ConvConnectorLayer`), turning SAM hidden states 12/18/24 into the decoder's 3-level pyramid
  512ch@128², 1024ch@64², 2048ch@32².

`pixel_shuffle` reproduces the reshape/permute order of X-SAM's `xsam.model.utils.pixel_shuffle`
(InternVL's `pixel_shuffle`, "v2" with the final permute), not `torch.nn.PixelShuffle`: the channel
order decides which input row of the first Linear/Conv each sub-pixel meets, so it must match for
the released weights to load. For a downscale by 2 ([B, H, W, C] -> [B, H/2, W/2, 4C]) output
channel `k` of cell (i, j) is input channel `k mod C` of pixel
(2i + k // 2C, 2j + (k // C) mod 2): row offset is the slow index, column offset the middle one.
For an upscale by 2 ([B, H, W, C] -> [B, 2H, 2W, C/4]) input channel `k` of pixel (i, j) goes to
(2i + (k // (C/4)) mod 2, 2j + k // (C/2)), channel `k mod C/4`: column offset is the slow index.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from transformers.models.sam.modeling_sam import SamLayerNorm


def _exact_int(value: float, what: str) -> int:
    """`value` as an int, or a ValueError naming `what` when it is not a whole number."""
    if value <= 0 or value != int(value):
        raise ValueError(f"{what} must be a positive whole number, got {value}")
    return int(value)


def pixel_shuffle(x: Tensor, scale: float) -> Tensor:
    """Resample a channels-last map [B, H, W, C] to [B, H*scale, W*scale, C/scale²].

    `scale` < 1 folds (1/scale)x(1/scale) pixel blocks into channels (unshuffle, e.g. 0.5: 2x2
    blocks -> 4C); `scale` > 1 spreads channels over sub-pixels (shuffle). Channel order: see the module docstring
    (X-SAM/InternVL convention). Sizes must come out whole; odd grids are rejected rather than
    padded (X-SAM's `maybe_pad` zero-pads them, which never happens for SAM's 64x64 grid).
    """
    if x.ndim != 4:
        raise ValueError(f"pixel_shuffle expects [B, H, W, C], got shape {tuple(x.shape)}")
    batch, height, width, channels = x.shape
    new_height = _exact_int(height * scale, f"grid height {height} x scale {scale}")
    new_width = _exact_int(width * scale, f"grid width {width} x scale {scale}")
    mid_channels = _exact_int(channels / scale, f"channels {channels} / scale {scale}")
    out_channels = _exact_int(channels / scale**2, f"channels {channels} / scale² {scale**2}")
    x = x.reshape(batch, height, new_width, mid_channels).permute(0, 2, 1, 3)
    x = x.reshape(batch, new_width, new_height, out_channels).permute(0, 2, 1, 3)
    return x.contiguous()


def pixel_unshuffle_tokens(x: Tensor, ratio: float = 0.5) -> Tensor:
    """SAM hidden state [B, H, W, C] -> tokens [B, (H*ratio)*(W*ratio), C/ratio²], row-major.

    X-SAM's `seg_projector` input (spec §3, `downsample_ratio=0.5`): 64x64x1024 -> 32x32x4096 ->
    1024 tokens of width 4096.
    """
    x = pixel_shuffle(x, ratio)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


class MLPProjector(nn.Module):
    """Linear(in_dim -> hidden_dim) -> GELU -> Linear(hidden_dim -> out_dim) over the last axis.

    Args:
        in_dim: input width (1152 for SigLIP, 4096 after SAM's unshuffle, D_llm for `llm_projector`).
        hidden_dim: width after the first Linear (D_llm for the visual/seg projectors, 256 for
            `llm_projector`).
        out_dim: output width.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> [..., out_dim]."""
        return self.layers(x)


class SegTokenProjector(nn.Module):
    """The dual-encoder path into the LLM: pixel-unshuffle, then `MLPProjector(C/r² -> D_llm -> D_llm)`.

    Args:
        in_channels: SAM hidden width C (1024 for SAM-L).
        llm_dim: LLM hidden width D_llm.
        downsample_ratio: unshuffle ratio r (0.5: 2x2 cells per token, 4x fewer tokens).
    """

    def __init__(self, *, in_channels: int, llm_dim: int, downsample_ratio: float = 0.5) -> None:
        super().__init__()
        self.downsample_ratio = downsample_ratio
        unshuffled = _exact_int(in_channels / downsample_ratio**2, f"in_channels {in_channels} / ratio²")
        self.projector = MLPProjector(in_dim=unshuffled, hidden_dim=llm_dim, out_dim=llm_dim)

    def forward(self, hidden_state: Tensor) -> Tensor:
        """SAM hidden state [B, H, W, C] -> LLM tokens [B, H*W*r², D_llm]."""
        return self.projector(pixel_unshuffle_tokens(hidden_state, self.downsample_ratio))


class _ConnectorLevel(nn.Module):
    """One pyramid level: 1x1 conv + LN, 3x3 conv + LN, 1x1 conv to base*s + LN, pixel-shuffle by s."""

    def __init__(self, *, in_channels: int, hidden_dim: int, conv_channels: int, scale: float, bias: bool) -> None:
        super().__init__()
        self.scale = scale
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1, bias=bias),
            SamLayerNorm(hidden_dim, data_format="channels_first"),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=bias),
            SamLayerNorm(hidden_dim, data_format="channels_first"),
            nn.Conv2d(hidden_dim, conv_channels, kernel_size=1, bias=bias),
            SamLayerNorm(conv_channels, data_format="channels_first"),
        )

    def forward(self, hidden_state: Tensor) -> Tensor:
        """[B, H, W, C_sam] -> [B, base/s, H*s, W*s]."""
        x = self.block(hidden_state.permute(0, 3, 1, 2))
        x = pixel_shuffle(x.permute(0, 2, 3, 1), self.scale)
        return x.permute(0, 3, 1, 2).contiguous()


class SegConnector(nn.Module):
    """X-SAM's "conv" connector: SAM hidden states -> the decoder's multi-scale pyramid (spec §3).

    Level i convolves to `base_channels * s_i` channels and pixel-shuffles by s_i, which leaves
    `base_channels / s_i` channels on an (H*s_i)² grid: for SAM-L at 1024 px (C_sam 1024, grid 64)
    and scales (2, 1, 0.5) that is 2048 -> 512ch@128², 1024ch@64², 512 -> 2048ch@32², matching the
    decoder's `feature_channels=[512, 1024, 2048]`. X-SAM's config lists scales [4, 2, 1, 0.5] for
    layers [6, 12, 18, 24] but only the last 3 are used (3 decoder levels); pass those 3 here.

    Args:
        in_channels: SAM hidden width C_sam (1024 for SAM-L).
        hidden_dim: bottleneck width of the 1x1/3x3 convs (`connector_hidden_dim`, 512).
        scale_factors: one resampling factor per level, high resolution first (the decoder reads
            its inputs in that order); each must give whole channel counts and grid sizes.
        base_channels: channels before resampling at scale 1. X-SAM uses the SAM width here
            (`int(in_channels * scale_factor)`); a separate knob lets tiny test models differ.
        bias: conv biases. X-SAM's `ConnectorConfig(bias=False)` is never overridden (every conv is
            followed by a LayerNorm, which makes a bias redundant), so False is the paper's layout.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_dim: int = 512,
        scale_factors: Sequence[float] = (2.0, 1.0, 0.5),
        base_channels: int = 1024,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not scale_factors:
            raise ValueError("scale_factors is empty: give one factor per decoder level, e.g. (2.0, 1.0, 0.5)")
        if list(scale_factors) != sorted(scale_factors, reverse=True):
            raise ValueError(f"scale_factors {tuple(scale_factors)} must be non-increasing (high resolution first)")
        self.scale_factors = tuple(float(s) for s in scale_factors)
        conv_channels = [
            _exact_int(base_channels * s, f"base_channels {base_channels} x scale {s}") for s in scale_factors
        ]
        self.out_channels = tuple(
            _exact_int(c / s**2, f"conv channels {c} / scale² {s**2}") for c, s in zip(conv_channels, scale_factors)
        )
        self.levels = nn.ModuleList(
            _ConnectorLevel(in_channels=in_channels, hidden_dim=hidden_dim, conv_channels=c, scale=s, bias=bias)
            for c, s in zip(conv_channels, self.scale_factors)
        )

    def forward(self, hidden_states: Sequence[Tensor]) -> list[Tensor]:
        """One SAM hidden state [B, H, W, C_sam] per level -> NCHW maps, high resolution first."""
        if len(hidden_states) != len(self.levels):
            raise ValueError(
                f"SegConnector has {len(self.levels)} levels (scales {self.scale_factors}) but got "
                f"{len(hidden_states)} hidden states: select the last {len(self.levels)} SAM layers"
            )
        return [level(state) for level, state in zip(self.levels, hidden_states)]
