"""Per-part parameter counts of configs/model/xsam-paper.yaml (meta device, no weights) against the
published component configs, each instantiated with transformers' own classes (docs/model.md).

The published values are the `config.json` fields of the Hugging Face repositories named below that
change a parameter count; everything else is each class's default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerModel,
    Phi3Config,
    Phi3ForCausalLM,
    SamConfig,
    SamModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinConfig,
)

from xsam.model.build import build_xsam, count_parameters
from xsam.model.config import load_model_config

PAPER = Path(__file__).resolve().parents[3] / "configs" / "model" / "xsam-paper.yaml"

# microsoft/Phi-3-mini-4k-instruct
PHI3 = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False)
PHI3_TOKENIZER_SIZE = 32011  # len(tokenizer) of that repository; X-SAM adds <SEG>, <p>, </p> and resizes to it
# google/siglip2-so400m-patch14-384, vision_config
SIGLIP2 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
               patch_size=14)
# facebook/sam-vit-large, vision_config
SAM_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_dim=4096,
             global_attn_indexes=[5, 11, 17, 23], output_channels=256)
# facebook/mask2former-swin-large-coco-panoptic
SWIN_L = dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, image_size=384,
              out_features=["stage1", "stage2", "stage3", "stage4"])
M2F = dict(num_queries=200, num_labels=133, feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_layers=6,
           decoder_layers=10, num_attention_heads=8, dim_feedforward=2048, encoder_feedforward_dim=1024)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def ours() -> dict[str, int]:
    cfg = load_model_config(PAPER)
    with torch.device("meta"):
        model = build_xsam(cfg, pretrained=False, resize_embeddings=False)
        model.llm.resize_token_embeddings(PHI3_TOKENIZER_SIZE + 3, mean_resizing=False)  # what the tokenizer does
    return {part: c["total"] for part, c in count_parameters(model).items()}


@pytest.fixture(scope="module")
def published() -> dict[str, int]:
    with torch.device("meta"):
        phi3 = Phi3ForCausalLM(Phi3Config(**PHI3))
        siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP2))
        sam = SamModel(SamConfig(vision_config=SAM_L))
        m2f = Mask2FormerModel(Mask2FormerConfig(backbone_config=SwinConfig(**SWIN_L), **M2F))
    decoder = m2f.pixel_level_module.decoder
    return {
        "llm": _count(phi3),
        "vision_encoder": _count(siglip),
        "seg_encoder": _count(sam.vision_encoder),
        "sam_total": _count(sam),
        "decoder": _count(decoder) + _count(m2f.transformer_module),
        # the pixel decoder's 1x1 input projections (and its FPN lateral conv) take the backbone's channels:
        # Swin-L gives 384/768/1536 (+192 lateral), X-SAM's connector 1024/2048... see docs/model.md
        "decoder_backbone_dependent": sum(_count(p) for p in decoder.input_projections)
        + _count(decoder.adapter_1),
        "m2f_total": _count(m2f),
    }


def test_phi3_and_the_encoders_within_one_percent(ours, published) -> None:
    assert published["llm"] == 3_821_079_552  # the published "3.8B"
    assert ours["llm"] == published["llm"] - 50 * 3072 * 2 == 3_820_772_352  # 50 padding rows cut, in and out
    assert abs(ours["llm"] - published["llm"]) / published["llm"] < 0.01
    assert ours["vision_encoder"] == published["vision_encoder"] == 428_225_600
    assert ours["seg_encoder"] == published["seg_encoder"] == 308_278_272
    assert published["sam_total"] == 312_343_088  # SAM ViT-L with prompt encoder and mask decoder


def test_decoder_equals_mask2former_on_xsams_pyramid(ours, published) -> None:
    """Our decoder = the published Mask2Former pixel decoder + transformer module; the only difference is the
    backbone-dependent input projections (Swin-L's channels vs the connector's 512/1024/2048)."""
    assert published["m2f_total"] == pytest.approx(216e6, rel=0.01)  # the published ~216M with Swin-L
    swin_channels = (192, 384, 768, 1536)
    xsam_channels = (512, 512, 1024, 2048)  # lateral (stride 8) + the three deformable levels
    extra = sum((x - s) * 256 for x, s in zip(xsam_channels, swin_channels))
    assert ours["decoder"] - published["decoder"] == extra == 311_296
    # without the backbone-dependent projections the two are the same network
    same = published["decoder"] - published["decoder_backbone_dependent"]
    assert ours["decoder"] - (published["decoder_backbone_dependent"] + extra) == same
    assert abs(ours["decoder"] - published["decoder"]) / published["decoder"] < 0.016
