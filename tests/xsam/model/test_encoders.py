"""SigLIP and SAM encoder wrappers (spec §3 "Encoders and projectors", §8 "SAM layers / connector",
"seg_projector"): selected hidden states, local loading, freezing, paper-size shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    SamConfig,
    SamModel,
    SamVisionConfig,
    SamVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from xsam.model.connector import SegConnector, SegTokenProjector
from xsam.model.encoders import SegEncoder, VisionEncoder

TINY_SAM_LAYERS = (2, 3, 4)


def tiny_vision_config() -> SiglipVisionConfig:
    """SigLIP hidden 64, 2 layers, 64 px, patch 16: 4x4 = 16 tokens."""
    return SiglipVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16
    )


def tiny_sam_config() -> SamVisionConfig:
    """SAM hidden 64, 4 blocks (2 global, 2 windowed on 4x4 windows), 128 px, patch 16: 8x8 grid."""
    return SamVisionConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=128,
        global_attn_indexes=[1, 3],
        window_size=4,
        image_size=128,
        patch_size=16,
        output_channels=32,
        initializer_range=0.02,  # the config's default 1e-10 makes a random encoder output ~0
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _tiny_vision() -> VisionEncoder:
    return VisionEncoder.from_config(tiny_vision_config()).eval()


def _tiny_sam() -> SegEncoder:
    return SegEncoder.from_config(tiny_sam_config(), select_layers=TINY_SAM_LAYERS).eval()


@pytest.mark.parametrize("select_layer", [-2, 1])
def test_vision_encoder_selects_hf_hidden_state(select_layer: int) -> None:
    encoder = VisionEncoder.from_config(tiny_vision_config(), select_layer=select_layer).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = encoder(pixel_values)
        reference = encoder.model(pixel_values, output_hidden_states=True)
    assert tokens.shape == (2, 16, 64)
    assert len(reference.hidden_states) == 3
    torch.testing.assert_close(tokens, reference.hidden_states[select_layer], rtol=0, atol=0)


def test_vision_encoder_penultimate_is_block_before_last() -> None:
    """-2 = output of the second-to-last block, i.e. embeddings through all blocks but the last."""
    encoder = _tiny_vision()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        state = encoder.model.embeddings(pixel_values)
        for layer in encoder.model.encoder.layers[:-1]:
            state = layer(state, attention_mask=None)
        torch.testing.assert_close(encoder(pixel_values), state)


def test_vision_encoder_rejects_out_of_range_layer() -> None:
    with pytest.raises(ValueError, match="select_layer"):
        VisionEncoder.from_config(tiny_vision_config(), select_layer=3)


def test_seg_encoder_selects_hf_hidden_states() -> None:
    encoder = _tiny_sam()
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        output = encoder(pixel_values)
        reference = encoder.model(pixel_values, output_hidden_states=True)
    assert len(reference.hidden_states) == 5
    assert output.tokens_state.shape == (2, 8, 8, 64)
    assert [tuple(s.shape) for s in output.pyramid_states] == [(2, 8, 8, 64)] * 3
    torch.testing.assert_close(output.tokens_state, reference.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(output.tokens_state, reference.hidden_states[3], rtol=0, atol=0)
    for state, layer in zip(output.pyramid_states, TINY_SAM_LAYERS):
        torch.testing.assert_close(state, reference.hidden_states[layer], rtol=0, atol=0)


def test_seg_encoder_layer_numbers_are_one_based_blocks() -> None:
    """hidden_states[i] is the output of block i (before the neck): layer 4 = all 4 blocks."""
    encoder = _tiny_sam()
    vision = encoder.model.vision_encoder
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        state = vision.patch_embed(pixel_values) + vision.pos_embed
        blocks = []
        for layer in vision.layers:
            state = layer(state)
            blocks.append(state)
        output = encoder(pixel_values)
    torch.testing.assert_close(output.tokens_state, blocks[2])
    for state, layer in zip(output.pyramid_states, TINY_SAM_LAYERS):
        torch.testing.assert_close(state, blocks[layer - 1])


@pytest.mark.parametrize("select_layers", [(), (0, 2), (2, 5)])
def test_seg_encoder_rejects_bad_layers(select_layers: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="select_layers"):
        SegEncoder.from_config(tiny_sam_config(), select_layers=select_layers)


def test_default_seg_layers_need_a_24_block_encoder() -> None:
    """Default (12, 18, 24) = last 3 of X-SAM's seg_select_layers; too deep for the tiny encoder."""
    with pytest.raises(ValueError, match="1..4"):
        SegEncoder.from_config(tiny_sam_config())


def test_seg_encoder_feeds_connector_and_token_projector() -> None:
    encoder = _tiny_sam()
    output = encoder(torch.randn(1, 3, 128, 128))
    tokens = SegTokenProjector(in_channels=encoder.hidden_size, llm_dim=32)(output.tokens_state)
    assert tokens.shape == (1, 16, 32)
    pyramid = SegConnector(in_channels=encoder.hidden_size, hidden_dim=32, base_channels=64)(output.pyramid_states)
    assert [tuple(p.shape) for p in pyramid] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4)]


def test_vision_from_pretrained_bare_and_full_siglip(tmp_path: Path) -> None:
    pixel_values = torch.randn(1, 3, 64, 64)
    bare = SiglipVisionModel(tiny_vision_config()).eval()
    bare.save_pretrained(tmp_path / "bare")
    text_config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    full = SiglipModel(SiglipConfig(vision_config=tiny_vision_config().to_dict(), text_config=text_config)).eval()
    full.save_pretrained(tmp_path / "full")
    for directory, vision_tower in ((tmp_path / "bare", bare), (tmp_path / "full", full.vision_model)):
        loaded = VisionEncoder.from_pretrained(directory).eval()
        assert isinstance(loaded.model, SiglipVisionModel)
        with torch.no_grad():
            expected = vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(loaded(pixel_values), expected, rtol=0, atol=0)


def test_seg_from_pretrained_bare_and_full_sam(tmp_path: Path) -> None:
    pixel_values = torch.randn(1, 3, 128, 128)
    bare = SamVisionModel(tiny_sam_config()).eval()
    bare.save_pretrained(tmp_path / "bare")
    full = SamModel(SamConfig(vision_config=tiny_sam_config().to_dict())).eval()
    full.save_pretrained(tmp_path / "full")
    for directory, vision_tower in ((tmp_path / "bare", bare.vision_encoder), (tmp_path / "full", full.vision_encoder)):
        loaded = SegEncoder.from_pretrained(directory, select_layers=TINY_SAM_LAYERS).eval()
        assert isinstance(loaded.model, SamVisionModel)
        with torch.no_grad():
            expected = vision_tower(pixel_values, output_hidden_states=True).hidden_states
            output = loaded(pixel_values)
        torch.testing.assert_close(output.tokens_state, expected[3], rtol=0, atol=0)
        torch.testing.assert_close(output.pyramid_states[0], expected[2], rtol=0, atol=0)


@pytest.mark.parametrize("encoder_class", [VisionEncoder, SegEncoder])
def test_from_pretrained_missing_directory(tmp_path: Path, encoder_class: type[VisionEncoder | SegEncoder]) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        encoder_class.from_pretrained(missing)


def test_frozen_encoders_get_no_grads() -> None:
    vision, seg = _tiny_vision(), _tiny_sam()
    vision.requires_grad_(False)
    seg.requires_grad_(False)
    head = nn.Linear(64, 1)
    output = seg(torch.randn(1, 3, 128, 128))
    loss = head(vision(torch.randn(1, 3, 64, 64))).sum() + sum(head(s).sum() for s in output.pyramid_states)
    (loss + head(output.tokens_state).sum()).backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in [*vision.parameters(), *seg.parameters()])


def test_unfrozen_seg_encoder_gets_grads_in_selected_blocks() -> None:
    seg = _tiny_sam()
    seg(torch.randn(1, 3, 128, 128)).pyramid_states[-1].sum().backward()
    assert seg.model.vision_encoder.layers[-1].mlp.lin2.weight.grad is not None
    assert seg.model.vision_encoder.patch_embed.projection.weight.grad is not None


def test_paper_size_encoders_on_meta() -> None:
    """SigLIP so400m at 384 px: 27x27 = 729 tokens of 1152; SAM ViT-L at 1024 px: 64x64x1024.

    Parameter counts vs published figures: SigLIP so400m vision tower (incl. attention-pooling
    head) ~428M; SAM ViT-L image encoder 308M (SAM paper; the brief's ~303M is also within 2%).
    """
    siglip = SiglipVisionConfig(
        hidden_size=1152,
        num_hidden_layers=27,
        num_attention_heads=16,
        intermediate_size=4304,
        patch_size=14,
        image_size=384,
    )
    sam = SamVisionConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        mlp_dim=4096,
        global_attn_indexes=[5, 11, 17, 23],
        image_size=1024,
        patch_size=16,
    )
    with torch.device("meta"):
        vision = VisionEncoder.from_config(siglip)
        seg = SegEncoder.from_config(sam)
        tokens = vision(torch.empty(1, 3, 384, 384))
        output = seg(torch.empty(1, 3, 1024, 1024))
    assert tokens.shape == (1, 729, 1152)
    assert output.tokens_state.shape == (1, 64, 64, 1024)
    assert [tuple(s.shape) for s in output.pyramid_states] == [(1, 64, 64, 1024)] * 3
    vision_params = sum(p.numel() for p in vision.parameters())
    seg_params = sum(p.numel() for p in seg.parameters())
    print(f"SigLIP so400m vision tower: {vision_params / 1e6:.2f}M params")
    print(f"SAM ViT-L image encoder: {seg_params / 1e6:.2f}M params")
    assert vision_params == pytest.approx(428e6, rel=0.02)
    assert seg_params == pytest.approx(308e6, rel=0.02)
    assert seg_params == pytest.approx(303e6, rel=0.02)


def test_from_pretrained_rejects_missing_vision_weights(tmp_path: Path) -> None:
    """A checkpoint lacking a vision weight (e.g. a wrong key prefix) fails instead of random-initialising it."""
    SiglipVisionModel(tiny_vision_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("patch_embedding.weight"))
    kept = {key: value for key, value in weights.items() if key != dropped}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="patch_embedding.weight"):
        VisionEncoder.from_pretrained(tmp_path)
