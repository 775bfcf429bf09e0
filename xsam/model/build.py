"""Build an `XSam` from an `XSamConfig` for one stage, freeze it, and group its parameters.

- `build_xsam(config, stage=...)` creates the parts the stage lists (spec §4: stage 1 has no LLM,
  stage 2 no decoder), each from its local pretrained directory or, with `pretrained=False` (tests,
  the meta device, before loading an exported checkpoint), from the architecture in the config.
  The LLM gets X-SAM's added tokens: its embeddings are resized to the tokenizer.
- `apply_stage(model, stage)` sets `requires_grad` per part (frozen parts also go to eval mode in
  the trainer) and `param_groups(model, stage, lr=..., weight_decay=...)` returns the optimizer
  groups, one per learning-rate multiplier (both encoders at lr x 0.1 in stages 1 and 3).
- `tokenizer_for(config)`: the tokenizer of the config (a local directory), or the deterministic
  offline tiny tokenizer when the config names none (tiny test models).

Building the paper-size model on the meta device (`torch.device("meta")` as a context manager)
allocates nothing: `xsam model summary` counts parameters that way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from xsam.model.config import COMPONENTS, StagePart, XSamConfig
from xsam.model.connector import MLPProjector, SegConnector, SegTokenProjector
from xsam.model.criterion import SegCriterion
from xsam.model.decoder import ClassHead, LinearClassHead, MaskDecoder, decoder_config
from xsam.model.encoders import SegEncoder, VisionEncoder
from xsam.model.llm import resize_for_added_tokens
from xsam.model.sampler import RegionSampler
from xsam.model.xsam import XSam

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenizer_for(config: XSamConfig) -> PreTrainedTokenizerBase:
    """The config's tokenizer with X-SAM's tokens added: `llm.tokenizer`, else `llm.pretrained`, else
    (no directory at all: a tiny test model) the offline tiny tokenizer, built once into a cache
    folder (`$XSAM_CACHE`, default `~/.cache/xsam`)."""
    from xsam.text.tokenizer import build_tiny_tokenizer, load_tokenizer

    folder = config.llm.tokenizer or config.llm.pretrained
    if folder is None:
        cache = Path(os.environ.get("XSAM_CACHE", Path.home() / ".cache" / "xsam"))
        digest = hashlib.sha256(Path(__file__).with_name("build.py").read_bytes()).hexdigest()[:12]
        target = cache / f"tiny-tokenizer-{digest}"
        if not (target / "tokenizer.json").is_file():
            tmp = cache / f".tiny-tokenizer-{digest}.{os.getpid()}"
            build_tiny_tokenizer(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process won the race; its copy is identical
                pass
        folder = str(target)
    return load_tokenizer(folder)


def available_tokenizer(config: XSamConfig) -> PreTrainedTokenizerBase | None:
    """`tokenizer_for(config)` when the tokenizer can be had here (its folder exists, or none is named:
    the tiny one), else None (a meta-device count of a config whose folders live on another machine)."""
    folder = config.llm.tokenizer or config.llm.pretrained
    if folder is not None and not Path(folder).is_dir():
        return None
    return tokenizer_for(config)


def _llm(config: XSamConfig, pretrained: bool, tokenizer: PreTrainedTokenizerBase | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    part = config.llm
    if pretrained and part.pretrained:
        directory = Path(part.pretrained)
        if not directory.is_dir():
            raise FileNotFoundError(f"llm.pretrained: {directory} is not a directory (a local HF model folder)")
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, attn_implementation=part.attn_implementation
        )
    else:
        if not part.config:
            raise ValueError("llm.config is empty: give the architecture (model_type, sizes) or llm.pretrained")
        values = dict(part.config)
        hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=part.attn_implementation)
    if tokenizer is not None:
        resize_for_added_tokens(model, tokenizer)
    return model


def _vision(config: XSamConfig, pretrained: bool) -> VisionEncoder:
    from transformers import SiglipVisionConfig

    part = config.vision
    if pretrained and part.pretrained:
        return VisionEncoder.from_pretrained(part.pretrained, select_layer=part.select_layer)
    return VisionEncoder.from_config(SiglipVisionConfig(**part.config), select_layer=part.select_layer)


def _seg_encoder(config: XSamConfig, pretrained: bool) -> SegEncoder:
    from transformers import SamVisionConfig

    part = config.seg_encoder
    if pretrained and part.pretrained:
        return SegEncoder.from_pretrained(part.pretrained, select_layers=part.select_layers)
    # transformers' SamVisionConfig defaults to initializer_range=1e-10 (its weights are always loaded),
    # which makes a randomly initialised encoder output ~0 for every image; use the usual 0.02 unless set
    values = {"initializer_range": 0.02, **part.config}
    return SegEncoder.from_config(SamVisionConfig(**values), select_layers=part.select_layers)


def build_xsam(
    config: XSamConfig,
    *,
    stage: str = "stage3",
    pretrained: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    resize_embeddings: bool = True,
) -> XSam:
    """The model of `stage`, parts from their pretrained directories (or random when `pretrained`
    is False or a part names none). `tokenizer` (default `tokenizer_for(config)`) sizes the LLM's
    embeddings; `resize_embeddings=False` keeps the config's vocabulary size instead (a meta-device
    summary without the tokenizer at hand)."""
    recipe = config.stage(stage)
    parts = set(recipe.components)
    if "llm" in parts and tokenizer is None and resize_embeddings:
        tokenizer = tokenizer_for(config)
    vision = _vision(config, pretrained) if "vision_encoder" in parts else None
    sam = _seg_encoder(config, pretrained) if "seg_encoder" in parts else None
    llm = _llm(config, pretrained, tokenizer) if "llm" in parts else None
    llm_dim = llm.get_input_embeddings().weight.shape[1] if llm is not None else None
    proj = config.projector
    hidden = decoder_config(**config.decoder.config).hidden_dim

    visual_projector = seg_projector = llm_projector = None
    if "visual_projector" in parts:
        assert vision is not None and llm_dim is not None, "visual_projector needs vision_encoder and llm"
        visual_projector = MLPProjector(in_dim=vision.hidden_size, hidden_dim=llm_dim, out_dim=llm_dim)
    if "seg_projector" in parts and proj.dual_encoder:
        assert sam is not None and llm_dim is not None, "seg_projector needs seg_encoder and llm"
        seg_projector = SegTokenProjector(
            in_channels=sam.hidden_size, llm_dim=llm_dim, downsample_ratio=proj.downsample_ratio
        )
    if "llm_projector" in parts:
        assert llm_dim is not None
        llm_projector = MLPProjector(in_dim=llm_dim, hidden_dim=proj.llm_projector_dim, out_dim=hidden)

    connector = decoder = class_head = None
    if "seg_connector" in parts:
        assert sam is not None
        c = config.connector
        connector = SegConnector(
            in_channels=sam.hidden_size, hidden_dim=c.hidden_dim, scale_factors=c.scale_factors,
            base_channels=c.base_channels or sam.hidden_size, bias=c.bias,
        )
    if "decoder" in parts:
        assert connector is not None
        decoder = MaskDecoder(config=decoder_config(**config.decoder.config), feature_channels=connector.out_channels,
                              deformable_backend=config.decoder.deformable_backend)
    if "class_head" in parts:
        head = config.class_head
        if recipe.class_head == "linear":
            class_head = LinearClassHead(hidden_dim=hidden, num_classes=head.num_classes)
        else:
            class_head = ClassHead(hidden_dim=hidden, clamp=head.clamp, pad_logit=head.pad_logit)

    loss = config.loss
    model = XSam(
        vision_encoder=vision, visual_projector=visual_projector, seg_encoder=sam, seg_projector=seg_projector,
        llm=llm, llm_projector=llm_projector, seg_connector=connector, decoder=decoder, class_head=class_head,
        region_sampler=RegionSampler(
            num_points=config.sampler.num_points, pool=config.sampler.pool,
            tokens_per_region=config.sampler.tokens_per_region,
        ),
        criterion=SegCriterion(
            class_weight=loss.class_weight, mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
            no_object_weight=loss.no_object_weight, num_points=loss.num_points,
            oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio,
        ),
        llm_weight=loss.llm_weight, seg_weight=loss.seg_weight, shared_tasks=config.conditions.shared_tasks,
        decoder_instances=config.conditions.decoder_instances,
    )
    apply_stage(model, recipe)
    return model


def apply_stage(model: XSam, stage: StagePart) -> None:
    """`requires_grad` True on the parts `stage` trains, False elsewhere (frozen parts get no grads).
    Encoder parameters that never reach X-SAM's selected hidden states (SigLIP's last block, post-
    layernorm and head; SAM's neck) are always frozen: they could not get a gradient."""
    for name, part in model.parts().items():
        part.requires_grad_(stage.is_trainable(name))
    for encoder in (model.vision_encoder, model.seg_encoder):
        if encoder is not None:
            for p in encoder.unused_parameters():
                p.requires_grad_(False)


def param_groups(model: XSam, stage: StagePart, *, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per learning-rate multiplier, trainable parameters only, each
    named (`name`, `parts`) so a scheduler or a log can tell them apart."""
    groups: dict[float, dict[str, Any]] = {}
    for name, part in model.parts().items():
        params = [p for p in part.parameters() if p.requires_grad]
        if not params:
            continue
        mult = stage.lr_mult.get(name, 1.0)  # type: ignore[call-overload]
        group = groups.setdefault(mult, {"params": [], "lr": lr * mult, "weight_decay": weight_decay,
                                         "lr_mult": mult, "parts": [], "name": f"lr_x{mult:g}"})
        group["params"].extend(params)
        group["parts"].append(name)
    return list(groups.values())


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for an `XSam` (works on the meta device); shared tensors
    (tied embeddings) are counted once, in the first part that holds them."""
    seen: set[int] = set()
    out: dict[str, dict[str, int]] = {}
    parts = model.parts() if isinstance(model, XSam) else {"model": model}
    for name, part in parts.items():
        total = trainable = 0
        for p in part.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        out[name] = {"total": total, "trainable": trainable}
    return out


__all__ = ["COMPONENTS", "apply_stage", "available_tokenizer", "build_xsam", "count_parameters", "param_groups", "tokenizer_for"]
