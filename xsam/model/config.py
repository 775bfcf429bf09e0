"""Typed X-SAM model configs, read from YAML (`configs/model/xsam-paper.yaml`, `configs/model/tiny.yaml`).

One `XSamConfig` describes the whole network of spec §3 and the three stages of §4 (which parts each
stage builds and trains, at which learning-rate multiplier). It is validated on construction (pydantic,
unknown keys rejected with the key named) and read with `yaml.safe_load` only.

Pretrained parts (`llm`, `vision`, `seg_encoder`) name a local Hugging Face directory in `pretrained`
and describe their architecture in `config` (the published `config.json` values): `config` is what a
meta-device build (`xsam model summary`) and a random initialisation use, `pretrained` is what a real
run loads weights (and the architecture) from. Nothing is ever downloaded. Relative paths are taken
against the current working directory (as X-SAM's `inits/...` paths are), or made absolute by
`load_model_config(path, base=...)`.

Defaults follow the paper branch (AAAI26_Archive, spec §8); `branch: main`-style behaviour is a change
of the keys that differ (`class_head.clamp`, `sampler.pool` / `tokens_per_region`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xsam.configio import format_validation, read_yaml
from xsam.data.schema import TASKS

# The parts of `XSam`, in the order they appear in the forward pass (also the names of its attributes).
COMPONENTS: tuple[str, ...] = (
    "vision_encoder",
    "visual_projector",
    "seg_encoder",
    "seg_projector",
    "llm",
    "llm_projector",
    "seg_connector",
    "decoder",
    "class_head",
)
Component = Literal[
    "vision_encoder", "visual_projector", "seg_encoder", "seg_projector", "llm", "llm_projector",
    "seg_connector", "decoder", "class_head",
]


class ModelConfigError(ValueError):
    """A model config file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainedPart(_Strict):
    """A part with a Hugging Face implementation: where its weights are, and its architecture."""

    pretrained: str | None = Field(default=None, description="local HF directory with config.json + weights")
    config: dict[str, Any] = Field(default_factory=dict, description="HF config values (the published config.json)")


class LLMPart(PretrainedPart):
    tokenizer: str | None = Field(
        default=None, description="tokenizer directory (default: `pretrained`); none for tiny test models"
    )
    chat_format: Literal["phi3_chat", "qwen3_instruct", "qwen3_wothinking"] = "phi3_chat"
    max_length: int = Field(default=2343, ge=1, description="text tokens per item (Phi-3: 4096 - 729 - 1024)")
    attn_implementation: str = Field(default="sdpa", description="'flash_attention_2' on GPUs that have it")

    @field_validator("config")
    @classmethod
    def _model_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value and "model_type" not in value:
            raise ValueError("llm.config needs `model_type` (e.g. phi3, qwen3) to pick the transformers class")
        return value


class VisionPart(PretrainedPart):
    select_layer: int = Field(default=-2, description="SigLIP hidden state fed to the LLM (penultimate)")


class SegEncoderPart(PretrainedPart):
    select_layers: tuple[int, int, int] = Field(
        default=(12, 18, 24), description="SAM blocks (1-based) feeding the connector's 3 levels"
    )


class ProjectorPart(_Strict):
    dual_encoder: bool = Field(default=True, description="SAM tokens after the SigLIP tokens at <image>")
    downsample_ratio: float = Field(default=0.5, gt=0, le=1, description="pixel-unshuffle of the SAM state")
    llm_projector_dim: int = Field(default=256, ge=1, description="hidden width of llm_projector (= decoder width)")


class ConnectorPart(_Strict):
    hidden_dim: int = Field(default=512, ge=1)
    scale_factors: tuple[float, float, float] = (2.0, 1.0, 0.5)
    base_channels: int | None = Field(default=None, description="default: the SAM hidden width (X-SAM)")
    bias: bool = Field(default=False, description="conv biases (X-SAM: none; each conv is followed by a LayerNorm)")


class DecoderPart(_Strict):
    config: dict[str, Any] = Field(
        default_factory=dict, description="Mask2FormerConfig overrides of xsam.model.decoder.decoder_config"
    )
    deformable_backend: Literal["auto", "torch", "kernel"] = Field(
        default="auto", description="deformable attention: the CUDA kernel when cached (auto), PyTorch, or required"
    )


class ClassHeadPart(_Strict):
    clamp: float = Field(default=500.0, gt=0, description="paper ±500, main ±50")
    pad_logit: float = -1e9
    num_classes: int = Field(default=133, ge=1, description="stage-1 linear head classes (COCO panoptic)")


class SamplerPart(_Strict):
    num_points: int = Field(default=256, ge=1)
    pool: Literal["max", "avg"] = "max"
    tokens_per_region: int = Field(default=1, ge=1, description="paper 1 (max), main 64 (avg)")


class LossPart(_Strict):
    llm_weight: float = Field(default=1.0, ge=0)
    seg_weight: float = Field(default=1.0, ge=0)
    class_weight: float = Field(default=2.0, ge=0)
    mask_weight: float = Field(default=5.0, ge=0)
    dice_weight: float = Field(default=5.0, ge=0)
    no_object_weight: float = Field(default=0.1, ge=0)
    num_points: int = Field(default=12544, ge=1)
    oversample_ratio: float = Field(default=3.0, ge=1)
    importance_sample_ratio: float = Field(default=0.75, ge=0, le=1)


class ConditionPart(_Strict):
    shared_tasks: tuple[str, ...] = Field(
        default=("refseg", "reaseg"),
        description="tasks whose conditions are concatenated over the batch (cross-sample negatives, §3.7)",
    )

    decoder_instances: Literal["per_seg", "last_seg"] = Field(
        default="per_seg",
        description="paper: every <SEG> drives its own decoder instance (one target per refseg turn); "
        "main: only each sample's last <SEG>, with every mask of the sample as its targets",
    )

    @field_validator("shared_tasks")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
        return value


class StagePart(_Strict):
    """One training stage of spec §4: which parts exist, which train, and their lr multipliers."""

    components: tuple[Component, ...]
    trainable: tuple[Component, ...] | Literal["all"] = "all"
    lr_mult: dict[Component, float] = Field(default_factory=dict)
    class_head: Literal["cosine", "linear"] = "cosine"

    @model_validator(mode="after")
    def _subset(self) -> StagePart:
        if len(set(self.components)) != len(self.components):
            raise ValueError("components lists a part twice")
        extra = sorted(set(() if self.trainable == "all" else self.trainable) - set(self.components))
        extra += sorted(set(self.lr_mult) - set(self.components))
        if extra:
            raise ValueError(f"trainable / lr_mult name parts the stage does not build: {extra}")
        if any(v <= 0 for v in self.lr_mult.values()):
            raise ValueError("lr_mult values must be > 0 (freeze a part by leaving it out of `trainable`)")
        needs = {
            "visual_projector": "vision_encoder", "seg_projector": "seg_encoder", "seg_connector": "seg_encoder",
            "decoder": "seg_connector", "class_head": "decoder", "llm_projector": "llm",
        }
        missing = sorted(f"{part} needs {dep}" for part, dep in needs.items()
                         if part in self.components and dep not in self.components)
        if missing:
            raise ValueError(f"inconsistent components: {missing}")
        return self

    def is_trainable(self, component: str) -> bool:
        return component in self.components and (self.trainable == "all" or component in self.trainable)


_ALL: tuple[Component, ...] = COMPONENTS  # type: ignore[assignment]


def _paper_stages() -> dict[str, StagePart]:
    """Spec §4 / §8: stage 1 segmentor fine-tune (SAM at lr x 0.1, linear 133+1 head), stage 2
    projector-only alignment (no decoder), stage 3 everything (both encoders at lr x 0.1)."""
    return {
        "stage1": StagePart(
            components=("seg_encoder", "seg_connector", "decoder", "class_head"),
            lr_mult={"seg_encoder": 0.1}, class_head="linear",
        ),
        "stage2": StagePart(
            components=("vision_encoder", "visual_projector", "seg_encoder", "seg_projector", "llm"),
            trainable=("visual_projector", "seg_projector"),
        ),
        "stage3": StagePart(components=_ALL, lr_mult={"vision_encoder": 0.1, "seg_encoder": 0.1}),
    }


class PostprocessPart(_Strict):
    """Spec §6 thresholds (evaluation values; `xsam predict` uses `display_threshold` for panoptic)."""

    panoptic_threshold: float = 0.0
    display_threshold: float = 0.5
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5
    gres_score_threshold: float = 0.6


class XSamConfig(_Strict):
    """The whole model (spec §3) and its stage recipes (spec §4)."""

    name: str = "xsam"
    llm: LLMPart = Field(default_factory=LLMPart)
    vision: VisionPart = Field(default_factory=VisionPart)
    seg_encoder: SegEncoderPart = Field(default_factory=SegEncoderPart)
    projector: ProjectorPart = Field(default_factory=ProjectorPart)
    connector: ConnectorPart = Field(default_factory=ConnectorPart)
    decoder: DecoderPart = Field(default_factory=DecoderPart)
    class_head: ClassHeadPart = Field(default_factory=ClassHeadPart)
    sampler: SamplerPart = Field(default_factory=SamplerPart)
    loss: LossPart = Field(default_factory=LossPart)
    conditions: ConditionPart = Field(default_factory=ConditionPart)
    preprocess: dict[str, Any] = Field(
        default_factory=dict, description="xsam.data.transforms.PreprocessConfig values (image sizes, means)"
    )
    postprocess: PostprocessPart = Field(default_factory=PostprocessPart)
    stages: dict[str, StagePart] = Field(default_factory=_paper_stages)

    @model_validator(mode="after")
    def _check(self) -> XSamConfig:
        from xsam.data.transforms import PreprocessConfig

        try:
            PreprocessConfig(**self.preprocess)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preprocess: {exc}") from None
        return self

    def stage(self, name: str) -> StagePart:
        """The stage recipe `name` (`stage1`, `stage2`, `stage3`, or one the file adds)."""
        if name not in self.stages:
            raise ModelConfigError(f"unknown stage {name!r}; this config has {sorted(self.stages)}")
        return self.stages[name]

    def preprocess_config(self, overrides: dict[str, Any] | None = None) -> Any:
        """The `PreprocessConfig` of `preprocess`, with `overrides` (a recipe's, e.g. stage 1's lsj) on top."""
        from xsam.data.transforms import PreprocessConfig

        values = {**self.preprocess, **(overrides or {})}
        return PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def resolved(self, base: Path) -> XSamConfig:
        """A copy whose relative `pretrained` / `tokenizer` paths are absolute against `base`."""

        def absolute(value: str | None) -> str | None:
            if value is None or Path(value).is_absolute():
                return value
            return str((base / value).resolve())

        return self.model_copy(update={
            "llm": self.llm.model_copy(update={
                "pretrained": absolute(self.llm.pretrained), "tokenizer": absolute(self.llm.tokenizer),
            }),
            "vision": self.vision.model_copy(update={"pretrained": absolute(self.vision.pretrained)}),
            "seg_encoder": self.seg_encoder.model_copy(update={"pretrained": absolute(self.seg_encoder.pretrained)}),
        })

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-ready dict that `parse_model_config` reads back to an equal config."""
        return self.model_dump(mode="json")


def parse_model_config(doc: Any, *, source: str = "<model config>") -> XSamConfig:
    """Validate a parsed model-config document."""
    if not isinstance(doc, dict):
        raise ModelConfigError(f"model config {source}: expected a mapping (llm, vision, seg_encoder, ...)")
    try:
        return XSamConfig.model_validate(doc)
    except ValidationError as exc:
        raise ModelConfigError(f"model config {source} is not valid:\n{format_validation(exc)}") from None


def load_model_config(path: str | Path, *, base: Path | None = None) -> XSamConfig:
    """Read and validate a model-config YAML (never executes anything in it); relative paths in it
    are made absolute against `base` (default: the current working directory)."""
    path = Path(path)
    doc = read_yaml(path, error=ModelConfigError, what="model config")
    return parse_model_config(doc, source=str(path)).resolved(base or Path.cwd())
