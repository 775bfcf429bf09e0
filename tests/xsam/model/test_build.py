"""Building from local Hugging Face folders (never the hub) and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, SamVisionConfig, SamVisionModel, SiglipVisionConfig, SiglipVisionModel

from xsam.model.build import build_xsam
from xsam.model.config import ModelConfigError, load_model_config, parse_model_config
from xsam.text import build_tiny_tokenizer, load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "configs" / "model" / "tiny.yaml"


def test_pretrained_parts_load_from_local_folders(tmp_path: Path) -> None:
    """Each part's weights come from its folder; the LLM gets X-SAM's tokens and a resized vocabulary."""
    doc = yaml.safe_load(TINY.read_text())
    torch.manual_seed(1)
    llm_values = dict(doc["llm"]["config"])
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(llm_values.pop("model_type"), **llm_values))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer_dir = build_tiny_tokenizer(tmp_path / "llm")  # the tokenizer lives with the LLM, as Phi-3's does
    SiglipVisionModel(SiglipVisionConfig(**doc["vision"]["config"])).save_pretrained(tmp_path / "siglip")
    sam_values = {"initializer_range": 0.02, **doc["seg_encoder"]["config"]}
    SamVisionModel(SamVisionConfig(**sam_values)).save_pretrained(tmp_path / "sam")
    doc["llm"]["pretrained"] = "llm"
    doc["vision"]["pretrained"] = "siglip"
    doc["seg_encoder"]["pretrained"] = "sam"
    config_file = tmp_path / "local.yaml"
    config_file.write_text(yaml.safe_dump(doc))
    cfg = load_model_config(config_file, base=tmp_path)
    assert cfg.llm.pretrained == str(tmp_path / "llm")

    model = build_xsam(cfg)
    tok = load_tokenizer(tokenizer_dir)
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.llm.state_dict()[layer], saved.state_dict()[layer])
    siglip = SiglipVisionModel.from_pretrained(tmp_path / "siglip")
    assert torch.equal(model.vision_encoder.model.embeddings.patch_embedding.weight,
                       siglip.embeddings.patch_embedding.weight)
    sam = SamVisionModel.from_pretrained(tmp_path / "sam")
    assert torch.equal(model.seg_encoder.model.vision_encoder.layers[2].attn.qkv.weight,
                       sam.vision_encoder.layers[2].attn.qkv.weight)

    missing = cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"pretrained": str(tmp_path / "nope")})})
    with pytest.raises(FileNotFoundError, match="nope"):
        build_xsam(missing)


@pytest.mark.parametrize("doc,match", [
    ({"llm": {"pretrainde": "x"}}, "llm.pretrainde: unknown key"),
    ({"llm": {"config": {"hidden_size": 8}}}, "model_type"),
    ({"stages": {"s": {"components": ["decoder"]}}}, "decoder needs seg_connector"),
    ({"stages": {"s": {"components": ["llm"], "trainable": ["decoder"]}}}, "does not build"),
    ({"stages": {"s": {"components": ["llm"], "lr_mult": {"llm": 0}}}}, "lr_mult values must be > 0"),
    ({"preprocess": {"seg_size": 0}}, "preprocess"),
    ({"conditions": {"shared_tasks": ["refsegg"]}}, "unknown tasks"),
])
def test_config_errors_name_the_key(doc, match) -> None:
    with pytest.raises(ModelConfigError, match=match):
        parse_model_config(doc, source="bad.yaml")


def test_config_round_trips_through_yaml() -> None:
    cfg = load_model_config(TINY)
    again = parse_model_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ModelConfigError, match="unknown stage 'stage4'"):
        cfg.stage("stage4")
