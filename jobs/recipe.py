"""Training recipes: typed YAML with `extends:` for shared parts and `--set KEY=VALUE` overrides.

A recipe says everything one stage of spec §4 needs: the model config and which of its stages to
build, the data mixture (an inline `xsam.data.mixture` document whose relative paths are taken
against `data.root`), the optimizer, the schedule, batch sizes, precision, the DeepSpeed ZeRO stage,
the parents to initialise from, checkpointing and MLflow. `resolve_recipe` reads the file chain
(`extends:` paths are relative to the file that names them; mappings merge key by key, anything else
is replaced), applies the overrides and validates the result; unknown keys are errors naming the key.

`deepspeed_config(recipe, world_size=..., precision=...)` derives the DeepSpeed config: the global
batch is `data.mixture.batching.global_batch_size`, split into micro-batches of
`train.micro_batch_size` per worker and gradient accumulation, which must come out whole.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xsam.configio import format_validation, read_yaml
from xsam.data.mixture import MixtureError, MixtureSpec, parse_mixture
from xsam.model.config import COMPONENTS

Precision = Literal["auto", "bf16", "fp16", "fp32"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InitSource(_Strict):
    """One parent checkpoint: which of our parameters it provides."""

    from_: str = Field(alias="from", description="inference folder, training checkpoint, s3:// or runs:/ URI")
    include: tuple[str, ...] = Field(min_length=1, description="module prefixes taken from it, e.g. [seg_encoder]")

    @model_validator(mode="after")
    def _parts(self) -> InitSource:
        unknown = sorted({p.split(".")[0] for p in self.include} - set(COMPONENTS))
        if unknown:
            raise ValueError(f"include names unknown parts {unknown}; parts are {list(COMPONENTS)}")
        return self


class DataPart(_Strict):
    root: str = Field(default=".", description="relative dataset paths of the mixture are taken against it")
    mixture: dict[str, Any] = Field(description="an xsam.data.mixture document (seed, batching, sources)")
    num_workers: int = Field(default=2, ge=0, description="loader processes per training worker")
    shuffle_buffer: int | None = Field(default=None, ge=1)
    preprocess: dict[str, Any] = Field(default_factory=dict, description="over the model config's preprocess "
                                       "(stage 1: lsj: true)")
    render: dict[str, Any] = Field(default_factory=dict, description="xsam.data.render.RenderOptions values "
                                   "(stage 1: mode: eval, the vocabulary in id order for the linear head)")


class OptimizerPart(_Strict):
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)


class SchedulePart(_Strict):
    """Linear warmup over `warmup_ratio` of the steps from `warmup_start_factor` x lr, then `cosine`
    to 0, or `multistep`: x `gamma` at each of `milestones` (epochs), as the paper's stage 1."""

    kind: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    warmup_start_factor: float = Field(default=1e-5, gt=0, le=1)
    milestones: tuple[int, ...] = ()
    gamma: float = Field(default=0.1, gt=0)

    @model_validator(mode="after")
    def _milestones(self) -> SchedulePart:
        if self.kind == "multistep" and not self.milestones:
            raise ValueError("a multistep schedule needs milestones (epochs)")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError("milestones must be increasing epochs")
        return self


class TrainPart(_Strict):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(ge=1, description="items per worker per forward pass")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (one per GPU on a cluster)")
    precision: Precision = Field(default="auto", description="auto: bf16 where the GPU has it, fp16 on older "
                                 "GPUs, fp32 on CPU")
    seed: int = 1024
    log_every_n_steps: int = Field(default=1, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="how Ray places the workers on nodes (Ray Train's ScalingConfig)")


class DeepSpeedPart(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed config")


class CheckpointPart(_Strict):
    every_n_steps: int = Field(default=200, ge=1)
    keep_last: int = Field(default=2, ge=1)


class MlflowPart(_Strict):
    experiment: str = "xsam"
    predictions_every_n_steps: int | None = Field(default=None, ge=1)
    # how long the end of a run waits for records the tracking server has not taken yet (a server
    # that is down when training ends); what is still unsent then is counted in a warning
    flush_timeout_s: float = Field(default=300.0, ge=0)


class Recipe(_Strict):
    """One training stage (spec §4)."""

    name: str
    model: str = Field(description="model config YAML (relative paths: against the recipe's folder's repo root)")
    stage: str = Field(description="which stage recipe of the model config to build and train")
    data: DataPart
    optimizer: OptimizerPart
    schedule: SchedulePart = Field(default_factory=SchedulePart)
    train: TrainPart
    deepspeed: DeepSpeedPart = Field(default_factory=DeepSpeedPart)
    init: tuple[InitSource, ...] = ()
    checkpoint: CheckpointPart = Field(default_factory=CheckpointPart)
    mlflow: MlflowPart = Field(default_factory=MlflowPart)

    def mixture(self) -> MixtureSpec:
        """The data mixture with its relative dataset paths made absolute against `data.root`."""
        doc = dict(self.data.mixture)
        if self.data.shuffle_buffer is not None:
            doc["shuffle_buffer"] = self.data.shuffle_buffer
        try:
            return parse_mixture(doc, source=f"recipe {self.name}: data.mixture", base=self.data.root)
        except MixtureError as err:
            raise RecipeError(str(err)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"recipe {path}: `extends` loops back to itself ({' -> '.join(str(p) for p in seen)})")
    doc = read_yaml(path, error=RecipeError, what="recipe")
    if not isinstance(doc, dict):
        raise RecipeError(f"recipe {path}: expected a mapping (name, model, stage, data, ...)")
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise RecipeError(f"recipe {path}: `extends` must be one file path")
    return _merge(_chain(path.parent / parent, (*seen, path)), doc)


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`KEY.SUB=VALUE` overrides (VALUE read as YAML: numbers, booleans, lists) onto `doc`."""
    out = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a mapping in the recipe")
            node = child
        node[parts[-1]] = value
    return out


def resolve_recipe(path: str | Path, overrides: list[str] = (), *, repo_root: Path | None = None) -> Recipe:
    """Read `path` with its `extends` chain, apply `overrides`, validate. `model` and `data.root`
    relative paths are taken against `repo_root` (default: the current directory)."""
    path = Path(path)
    doc = apply_overrides(_chain(path), list(overrides))
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        raise RecipeError(f"recipe {path} is not valid:\n{format_validation(exc)}") from None
    base = (repo_root or Path.cwd()).resolve()

    def absolute(value: str) -> str:
        uri = "://" in value or value.startswith("runs:/")
        return value if uri or Path(value).is_absolute() else str(base / value)

    return recipe.model_copy(update={
        "model": absolute(recipe.model),
        "data": recipe.data.model_copy(update={"root": absolute(recipe.data.root)}),
        "init": tuple(s.model_copy(update={"from_": absolute(s.from_)}) for s in recipe.init),
    })


def resolve_precision(requested: Precision, *, cuda: bool, bf16_supported: bool) -> str:
    """`auto`: bf16 on GPUs that have it, fp16 (dynamic loss scaling) on older GPUs, fp32 on CPU.
    fp16 on CPU is refused (DeepSpeed's CPU path has none)."""
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if cuda else "fp32"
    if requested == "fp16" and not cuda:
        raise RecipeError("train.precision fp16 needs a GPU (DeepSpeed on CPU runs fp32 or bf16)")
    return requested


def batch_layout(recipe: Recipe, world_size: int) -> dict[str, int]:
    """Global batch = micro-batch x workers x gradient accumulation, or a RecipeError saying which to change."""
    global_batch = recipe.mixture().batching.global_batch_size
    micro = recipe.train.micro_batch_size
    per_step = micro * world_size
    if global_batch % per_step:
        raise RecipeError(
            f"recipe {recipe.name}: global batch {global_batch} (data.mixture.batching.global_batch_size) is not a "
            f"multiple of micro_batch_size {micro} x {world_size} workers; change one of them"
        )
    return {"global_batch_size": global_batch, "micro_batch_size": micro, "world_size": world_size,
            "gradient_accumulation_steps": global_batch // per_step}


def deepspeed_config(recipe: Recipe, *, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config of `recipe` on `world_size` workers in `precision` (see module docstring)."""
    layout = batch_layout(recipe, world_size)
    ds = recipe.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True,
                     "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        if ds.zero_stage != 3:
            raise RecipeError("deepspeed.offload_param needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_batch_size": layout["global_batch_size"],
        "train_micro_batch_size_per_gpu": layout["micro_batch_size"],
        "gradient_accumulation_steps": layout["gradient_accumulation_steps"],
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # we hand DeepSpeed torch's AdamW with per-part lr groups
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.optimizer.grad_clip is not None:
        config["gradient_clipping"] = recipe.optimizer.grad_clip
    return _merge(config, ds.extra)
