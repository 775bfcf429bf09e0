"""Loading the released X-SAM weights (spec §4 "Checkpoints", §8): key map, readers, reports.

The released state dict is rebuilt at tiny size from modules laid out like the paper branch's `XSamModel`
(attribute names read from github.com/wanghao9610/X-SAM, branch AAAI26_Archive), so its key names come from the
module structure, not from the map under test. Values are compared through module attributes on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    Mask2FormerConfig,
    Phi3Config,
    Phi3ForCausalLM,
    SamConfig,
    SamModel,
    SamVisionConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.modeling_sam import SamLayerNorm

from xsam.model.connector import MLPProjector, SegConnector, SegTokenProjector, pixel_shuffle
from xsam.model.decoder import ClassHead, LinearClassHead, MaskDecoder, decoder_config
from xsam.model.encoders import SegEncoder, VisionEncoder
from xsam.model.official import (
    KNOWN_UNUSED,
    RULES,
    ConversionReport,
    convert_official_state_dict,
    official_to_ours,
    ours_to_official,
    read_official_dir,
)

LLM_DIM = 32
SIGLIP_DIM = 48
SAM_DIM = 64
HIDDEN = 32  # decoder width
SCALES = (2.0, 1.0, 0.5)
SAM_LAYERS = (2, 3, 4)


def tiny_phi3() -> Phi3ForCausalLM:
    config = Phi3Config(vocab_size=64, hidden_size=LLM_DIM, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    return Phi3ForCausalLM(config)


def tiny_siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=SIGLIP_DIM, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=96, image_size=32, patch_size=16)


def tiny_sam_config() -> SamVisionConfig:
    return SamVisionConfig(hidden_size=SAM_DIM, num_hidden_layers=4, num_attention_heads=2, mlp_dim=128,
                           global_attn_indexes=[1, 3], window_size=4, image_size=128, patch_size=16,
                           output_channels=32)


def tiny_decoder_config() -> Mask2FormerConfig:
    return decoder_config(feature_size=HIDDEN, mask_feature_size=HIDDEN, hidden_dim=HIDDEN, encoder_layers=1,
                          encoder_feedforward_dim=64, decoder_layers=3, dim_feedforward=64, num_attention_heads=4,
                          num_queries=10)


def connector_channels() -> tuple[int, ...]:
    return SegConnector(in_channels=SAM_DIM, hidden_dim=32, scale_factors=SCALES, base_channels=SAM_DIM).out_channels


# --- the paper branch's layout --------------------------------------------------------------------------------


class OfficialProjector(nn.Module):
    """DynamicProjectorModel (modules/projector/modeling_projector.py): `.model` = Linear, GELU, Linear."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class OfficialConnectorLayer(nn.Module):
    """ConvConnectorLayer (modules/connector/modeling_connector.py) with the config's bias=False."""

    def __init__(self, in_channels: int, hidden: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        out = int(in_channels * scale)
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            SamLayerNorm(hidden, data_format="channels_first"),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False),
            SamLayerNorm(hidden, data_format="channels_first"),
            nn.Conv2d(hidden, out, kernel_size=1, bias=False),
            SamLayerNorm(out, data_format="channels_first"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x.permute(0, 3, 1, 2))
        return pixel_shuffle(y.permute(0, 2, 3, 1), self.scale).permute(0, 3, 1, 2)


class OfficialConnector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleList(OfficialConnectorLayer(SAM_DIM, 32, s) for s in SCALES)


class SiglipTower4x(nn.Module):
    """transformers 4.x `SiglipVisionModel`: the tower sits under `.vision_model`."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(tiny_siglip_config())


class OfficialSegmentor(nn.Module):
    """XSegmentor (segmentors/x_segmentor.py) with a SAM encoder and a Mask2Former decoder."""

    def __init__(self, head: str) -> None:
        super().__init__()
        sam = SamModel(SamConfig(vision_config=tiny_sam_config().to_dict()))
        self.shared_image_embedding = sam.shared_image_embedding
        self.encoder = sam.vision_encoder
        config = tiny_decoder_config()
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(connector_channels()))
        self.decoder = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        if head == "open":
            self.logit_scale = nn.Parameter(torch.ones([1]) * 2.5)
        else:
            self.class_predictor = nn.Linear(HIDDEN, 133 + 1)


class OfficialS3(nn.Module):
    """XSamModel (xsam/xsam/model/xsam.py) as built by the stage-3 config."""

    def __init__(self) -> None:
        super().__init__()
        self.llm = tiny_phi3()
        self.visual_encoder = SiglipTower4x()
        self.segmentor = OfficialSegmentor("open")
        self.visual_projector = OfficialProjector(SIGLIP_DIM, LLM_DIM)
        self.llm_projector = OfficialProjector(LLM_DIM, HIDDEN)
        self.seg_projector = OfficialProjector(SAM_DIM * 4, LLM_DIM)
        self.seg_connector = OfficialConnector()
        self.bg_embeds = nn.Embedding(1, HIDDEN)


class OfficialS1(nn.Module):
    """XSamModel as built by the stage-1 config: no LLM, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentor = OfficialSegmentor("linear")
        self.seg_connector = OfficialConnector()


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and buffer distinct, so a crossed mapping cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return module.eval()


# --- ours ------------------------------------------------------------------------------------------------------


class Ours(nn.Module):
    """Our tiny model under XSam's attribute names (xsam/model/xsam.py)."""

    def __init__(self, stage: int, connector_bias: bool = False) -> None:
        super().__init__()
        self.seg_encoder = SegEncoder.from_config(tiny_sam_config(), select_layers=SAM_LAYERS)
        self.seg_connector = SegConnector(in_channels=SAM_DIM, hidden_dim=32, scale_factors=SCALES,
                                          base_channels=SAM_DIM, bias=connector_bias)
        self.decoder = MaskDecoder(config=tiny_decoder_config(), feature_channels=connector_channels())
        if stage == 1:
            self.class_head = LinearClassHead(hidden_dim=HIDDEN, num_classes=133)
            return
        self.llm = tiny_phi3()
        self.vision_encoder = VisionEncoder.from_config(tiny_siglip_config())
        self.visual_projector = MLPProjector(in_dim=SIGLIP_DIM, hidden_dim=LLM_DIM, out_dim=LLM_DIM)
        self.seg_projector = SegTokenProjector(in_channels=SAM_DIM, llm_dim=LLM_DIM)
        self.llm_projector = MLPProjector(in_dim=LLM_DIM, hidden_dim=HIDDEN, out_dim=HIDDEN)
        self.class_head = ClassHead(hidden_dim=HIDDEN)


def released_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def official_s3() -> OfficialS3:
    torch.manual_seed(0)
    return randomized(OfficialS3())


def load_converted(
    state: dict[str, torch.Tensor], stage: int, connector_bias: bool = False
) -> tuple[Ours, ConversionReport]:
    ours = Ours(stage, connector_bias)
    report = convert_official_state_dict(state, ours.state_dict().keys())
    ours.load_state_dict(report.state, strict=True)
    return ours.eval(), report


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stage3_every_key_produced_and_values_kept(official_s3: OfficialS3) -> None:
    ours, report = load_converted(released_state(official_s3), stage=3)
    assert report.ok, report.summary()
    assert report.known_unused == list(KNOWN_UNUSED)
    assert report.synthesized == []  # our connector is bias-free like the paper's

    off = official_s3
    assert_same(ours.llm.model.layers[1].self_attn.qkv_proj.weight, off.llm.model.layers[1].self_attn.qkv_proj.weight)
    assert_same(ours.llm.lm_head.weight, off.llm.lm_head.weight)
    assert_same(ours.vision_encoder.model.encoder.layers[1].mlp.fc2.weight,
                off.visual_encoder.vision_model.encoder.layers[1].mlp.fc2.weight)
    assert_same(ours.vision_encoder.model.head.probe, off.visual_encoder.vision_model.head.probe)
    assert_same(ours.visual_projector.layers[2].weight, off.visual_projector.model[2].weight)
    assert_same(ours.llm_projector.layers[0].bias, off.llm_projector.model[0].bias)
    assert_same(ours.seg_projector.projector.layers[0].weight, off.seg_projector.model[0].weight)
    sam_ours, sam_off = ours.seg_encoder.model.vision_encoder, off.segmentor.encoder
    assert_same(sam_ours.layers[3].attn.rel_pos_h, sam_off.layers[3].attn.rel_pos_h)
    assert_same(sam_ours.pos_embed, sam_off.pos_embed)
    assert_same(sam_ours.neck.conv2.weight, sam_off.neck.conv2.weight)
    assert_same(ours.decoder.pixel_decoder.level_embed, off.segmentor.pixel_decoder.level_embed)
    assert_same(ours.decoder.pixel_decoder.encoder.layers[0].self_attn.sampling_offsets.bias,
                off.segmentor.pixel_decoder.encoder.layers[0].self_attn.sampling_offsets.bias)
    assert_same(ours.decoder.transformer_module.queries_features.weight, off.segmentor.decoder.queries_features.weight)
    assert_same(ours.decoder.transformer_module.decoder.layers[1].cross_attn.in_proj_weight,
                off.segmentor.decoder.decoder.layers[1].cross_attn.in_proj_weight)
    assert ours.class_head.logit_scale.shape == (1,)
    assert_same(ours.class_head.logit_scale, off.segmentor.logit_scale)
    assert_same(ours.class_head.bg_embed, off.bg_embeds.weight)


def test_connector_biases_of_a_biased_connector_are_synthesized_as_zeros(official_s3: OfficialS3) -> None:
    """A config with `connector.bias: true` still loads the release: the missing biases are zeros."""
    ours, report = load_converted(released_state(official_s3), stage=3, connector_bias=True)
    assert report.ok, report.summary()
    assert report.synthesized == [f"seg_connector.levels.{i}.block.{j}.bias" for i in range(3) for j in (0, 2, 4)]
    assert all(float(ours.seg_connector.levels[i].block[j].bias.abs().sum()) == 0 for i in range(3) for j in (0, 2, 4))


def test_stage3_connector_computes_the_official_function(official_s3: OfficialS3) -> None:
    ours, _ = load_converted(released_state(official_s3), stage=3)
    states = [torch.randn(2, 8, 8, SAM_DIM) for _ in SCALES]
    with torch.no_grad():
        expected = [layer(state) for layer, state in zip(official_s3.seg_connector.model, states)]
        got = ours.seg_connector(states)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stage1_linear_head() -> None:
    torch.manual_seed(1)
    official = randomized(OfficialS1(), seed=1)
    ours, report = load_converted(released_state(official), stage=1)
    assert report.ok, report.summary()
    assert report.known_unused == list(KNOWN_UNUSED)
    assert_same(ours.class_head.linear.weight, official.segmentor.class_predictor.weight)
    assert_same(ours.class_head.linear.bias, official.segmentor.class_predictor.bias)


def test_stage2_subset_only_projectors(official_s3: OfficialS3) -> None:
    # The stage-2 file holds the two trained projectors only (frozen towers are not saved).
    state = {k: v for k, v in released_state(official_s3).items() if k.split(".")[0] in ("visual_projector",
                                                                                          "seg_projector")}
    ours = Ours(stage=3)
    expected = [k for k in ours.state_dict() if k.startswith(("visual_projector.", "seg_projector."))]
    report = convert_official_state_dict(state, expected)
    assert report.ok and sorted(report.state) == sorted(expected)


def test_unmatched_and_missing_are_reported(official_s3: OfficialS3) -> None:
    state = released_state(official_s3)
    state["bogus.weight"] = torch.zeros(3)
    state["pad_embeds.weight"] = torch.zeros(1, HIDDEN)  # main branch only
    state["segmentor.class_predictor.weight"] = torch.zeros(134, HIDDEN)  # stage-1 head, not in a stage-3 model
    del state["segmentor.decoder.queries_embedder.weight"]
    del state["seg_connector.model.1.model.2.weight"]
    report = convert_official_state_dict(state, Ours(stage=3).state_dict().keys())
    assert not report.ok
    assert sorted(report.unmatched_official) == ["bogus.weight", "pad_embeds.weight",
                                                 "segmentor.class_predictor.weight"]
    assert report.missing == ["decoder.transformer_module.queries_embedder.weight",
                              "seg_connector.levels.1.block.2.weight"]
    assert "bogus.weight" in report.summary()


def test_key_functions() -> None:
    assert official_to_ours("no.such.key") is None
    assert official_to_ours(KNOWN_UNUSED[0]) is None
    # transformers-5 SigLIP layout and main-branch names are not the release's.
    assert official_to_ours("visual_encoder.embeddings.patch_embedding.weight") is None
    assert official_to_ours("vision_encoder.vision_model.post_layernorm.weight") is None
    assert official_to_ours("segmentor.class_predictor.logit_scale") is None
    assert official_to_ours("segmentor.class_predictor.predictor.weight") is None
    assert official_to_ours("seg_connector.model.2.model.5.bias") == "seg_connector.levels.2.block.5.bias"
    assert official_to_ours("segmentor.encoder.layers.0.attn.qkv.weight") == (
        "seg_encoder.model.vision_encoder.layers.0.attn.qkv.weight")
    assert ours_to_official("class_head.bg_embed") == "bg_embeds.weight"
    assert ours_to_official("region_sampler.anything") is None
    assert len({rule.official for rule in RULES}) == len({rule.ours for rule in RULES}) == len(RULES)


def test_inverse_round_trip(official_s3: OfficialS3) -> None:
    for key in released_state(official_s3):
        if key in KNOWN_UNUSED:
            continue
        ours = official_to_ours(key)
        assert ours is not None and ours_to_official(ours) == key


# --- reading ---------------------------------------------------------------------------------------------------


def write_sharded(state: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    keys = sorted(state)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[index::shards]}
        save_file(part, directory / name)
        weight_map.update({key: name for key in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert_same(a[key], b[key])


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_wrapped"])
def test_read_then_convert(layout: str, tmp_path: Path, official_s3: OfficialS3) -> None:
    state = released_state(official_s3)
    state["bogus.weight"] = torch.arange(4.0)
    if layout == "single":
        save_file(state, tmp_path / "model.safetensors")
    elif layout == "sharded":
        write_sharded(state, tmp_path)
    elif layout == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        torch.save({"state_dict": state}, tmp_path / "pytorch_model.bin")
    loaded = read_official_dir(tmp_path)
    assert_states_equal(loaded, state)
    ours = Ours(stage=3)
    report = convert_official_state_dict(loaded, ours.state_dict().keys())
    assert report.unmatched_official == ["bogus.weight"] and not report.missing
    ours.load_state_dict(report.state, strict=True)
    assert_same(ours.class_head.bg_embed, official_s3.bg_embeds.weight)


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_official_dir(tmp_path / "absent")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        read_official_dir(tmp_path / "pytorch_model.bin")
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        read_official_dir(tmp_path)

    tensors = {"a": torch.zeros(2), "b": torch.ones(3)}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_sharded(tensors, sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_official_dir(sharded)

    no_index = tmp_path / "no_index"
    no_index.mkdir()
    save_file(tensors, no_index / "model-00001-of-00001.safetensors")
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        read_official_dir(no_index)

    stale = tmp_path / "stale"
    stale.mkdir()
    save_file(tensors, stale / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors", "c": "model-00001-of-00001.safetensors"}}
    (stale / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="disagrees"):
        read_official_dir(stale)

    export = tmp_path / "xtuner_model"
    for name in ("llm", "segmentor_encoder", "visual_projector"):
        (export / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pth_to_hf"):
        read_official_dir(export)

    not_tensors = tmp_path / "not_tensors"
    not_tensors.mkdir()
    torch.save({"a": 1}, not_tensors / "pytorch_model.bin")
    with pytest.raises(ValueError, match="flat dict of tensors"):
        read_official_dir(not_tensors)
