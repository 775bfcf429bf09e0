"""The training job: one stage of X-SAM (spec §4) from a recipe (`jobs/recipe.py`).

This module holds what the job resolves before any worker starts, which is also what
`xsam train RECIPE --dry-run` prints: the resolved recipe, the model of the stage built on the meta
device (parts, trainable parameters, learning-rate groups), the data mixture and, when its datasets
are at hand, the epoch plan and the number of optimizer steps, the learning-rate schedule's shape
and the DeepSpeed config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.recipe import Recipe, RecipeError, batch_layout, deepspeed_config, resolve_precision


@dataclass(kw_only=True)
class TrainingPlan:
    recipe: Recipe
    world_size: int
    precision: str
    deepspeed: dict[str, Any]
    parts: dict[str, dict[str, int]]
    lr_groups: list[dict[str, Any]]
    mixture: dict[str, Any]
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.model_dump(mode="json", by_alias=True),
            "world_size": self.world_size,
            "precision": self.precision,
            "deepspeed": self.deepspeed,
            "parts": self.parts,
            "lr_groups": self.lr_groups,
            "mixture": self.mixture,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "notes": self.notes,
        }


def _model_summary(recipe: Recipe) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]], list[str]]:
    """Build the stage's model on the meta device: per-part counts and the optimizer's lr groups."""
    import torch

    from xsam.model.build import available_tokenizer, build_xsam, count_parameters, param_groups
    from xsam.model.config import ModelConfigError, load_model_config

    notes: list[str] = []
    try:
        cfg = load_model_config(recipe.model)
        stage = cfg.stage(recipe.stage)
    except ModelConfigError as err:
        raise RecipeError(f"recipe {recipe.name}: model: {err}") from None
    tokenizer = available_tokenizer(cfg) if "llm" in stage.components else None
    if "llm" in stage.components and tokenizer is None:
        notes.append(f"tokenizer folder {cfg.llm.tokenizer or cfg.llm.pretrained} is not here: "
                     "the LLM's vocabulary is the config's")
    with torch.device("meta"):
        model = build_xsam(cfg, stage=recipe.stage, pretrained=False, tokenizer=tokenizer,
                           resize_embeddings=tokenizer is not None)
    groups = [
        {"name": g["name"], "lr": g["lr"], "lr_mult": g["lr_mult"], "weight_decay": g["weight_decay"],
         "parts": g["parts"], "parameters": sum(p.numel() for p in g["params"])}
        for g in param_groups(model, stage, lr=recipe.optimizer.lr, weight_decay=recipe.optimizer.weight_decay)
    ]
    return count_parameters(model), groups, notes


def plan_training(recipe: Recipe, *, world_size: int | None = None, cuda: bool = False,
                  bf16_supported: bool = False) -> TrainingPlan:
    """Everything the job decides before it starts workers (see the module docstring)."""
    from xsam.data.loader import plan_summary
    from xsam.data.plan import open_sources

    world = world_size or recipe.train.num_workers
    precision = resolve_precision(recipe.train.precision, cuda=cuda, bf16_supported=bf16_supported)
    ds = deepspeed_config(recipe, world_size=world, precision=precision)
    parts, groups, notes = _model_summary(recipe)
    spec = recipe.mixture()
    mixture: dict[str, Any] = {"sources": [s.model_dump(exclude_none=True) for s in spec.sources],
                               "batching": spec.batching.model_dump(), "seed": spec.seed}
    steps_per_epoch = total = warmup = None
    for source in recipe.init:
        if "://" in source.from_:
            raise RecipeError(f"recipe {recipe.name}: init from {source.from_}: only local inference folders "
                              "are supported so far (s3:// and runs:/ parents are not)")
        if not (Path(source.from_) / "xsam.json").is_file():
            notes.append(f"init parent {source.from_} is not here (an inference folder: xsam.json, model.safetensors)")
    missing = [s.path for s in spec.sources if "://" not in s.path and not (Path(s.path) / "manifest.parquet").is_file()]
    if missing:
        notes.append(f"{len(missing)} dataset folders are not here (first: {missing[0]}): no epoch plan; "
                     "convert them or set data.root")
    else:
        summary = plan_summary(spec, open_sources(spec))
        mixture["plan"] = summary
        steps_per_epoch = summary["global_batches"]
        total = steps_per_epoch * recipe.train.epochs
        if recipe.train.max_steps is not None:
            total = min(total, recipe.train.max_steps)
        warmup = math.floor(total * recipe.schedule.warmup_ratio)
    layout = batch_layout(recipe, world)
    mixture["layout"] = layout
    return TrainingPlan(recipe=recipe, world_size=world, precision=precision, deepspeed=ds, parts=parts,
                        lr_groups=groups, mixture=mixture, steps_per_epoch=steps_per_epoch, total_steps=total,
                        warmup_steps=warmup, notes=notes)


# ------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), spec §4: linear warmup
    from `warmup_start_factor` over `warmup_ratio` of the steps, then cosine to 0 or step decay."""
    sched = recipe.schedule
    warmup = math.floor(total_steps * sched.warmup_ratio)
    if step < warmup:
        return sched.warmup_start_factor + (1 - sched.warmup_start_factor) * step / warmup
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        return sched.gamma ** sum(epoch >= m for m in sched.milestones)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------ worker

LOADER_STATE = "loader-rank{rank}.json"
TRAINER_STATE = "trainer.json"


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine over the stage's model, the rank's share of the stream."""
    import json
    import tempfile

    import deepspeed
    import ray.train
    import torch

    from xsam.data.builder import XSamBuilder
    from xsam.data.loader import StreamLoader
    from xsam.data.render import RenderOptions
    from xsam.model.build import build_xsam, param_groups, tokenizer_for
    from xsam.model.config import load_model_config

    # a shared-memory comm op DeepSpeed JIT-compiles on first use; training does not need it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    recipe = Recipe.model_validate(config["recipe"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(recipe.train.seed + rank)
    cfg = load_model_config(recipe.model)
    stage = cfg.stage(recipe.stage)
    tokenizer = tokenizer_for(cfg)  # the builder encodes text in every stage; build_xsam uses it for the LLM only
    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
    model = build_xsam(cfg, stage=recipe.stage, tokenizer=tokenizer)
    if recipe.init:
        from xsam.model.export import load_parents

        report = load_parents(model, [(source.from_, source.include) for source in recipe.init])
        if rank == 0:  # lineage: which parent gave which parts
            (Path(config["log_dir"]) / "parents.json").write_text(json.dumps(
                {"parents": [{"from": s.from_, "include": list(s.include)} for s in recipe.init],
                 "tensors": report.to_dict()}, indent=2))
    optimizer = torch.optim.AdamW(
        param_groups(model, stage, lr=recipe.optimizer.lr, weight_decay=recipe.optimizer.weight_decay),
        betas=recipe.optimizer.betas, eps=recipe.optimizer.eps,
    )
    total, per_epoch = config["total_steps"], config["steps_per_epoch"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total, steps_per_epoch=per_epoch, recipe=recipe)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config["deepspeed"])

    spec = recipe.mixture()
    builder = XSamBuilder(
        tokenizer=tokenizer.name_or_path, chat_format=cfg.llm.chat_format, max_length=cfg.llm.max_length,
        preprocess=cfg.preprocess_config(recipe.data.preprocess),
        render=RenderOptions(**recipe.data.render), seed=spec.seed, micro_batch_size=recipe.train.micro_batch_size,
    )
    loader = StreamLoader(spec, world_size=world, rank=rank, num_workers=recipe.data.num_workers,
                          micro_batch_size=recipe.train.micro_batch_size, builder=builder,
                          cache_dir=config.get("cache_dir"))
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag="state")
            loader.load_state_dict(json.loads((Path(folder) / LOADER_STATE.format(rank=rank)).read_text()))
            step = json.loads((Path(folder) / TRAINER_STATE).read_text())["step"]

    device = engine.device
    losses: list[float] = []
    log_path = Path(config["log_dir"]) / "steps.jsonl" if rank == 0 else None
    while step < total:
        for packed in loader:
            out = engine(packed.to(device), generator=torch.Generator(device).manual_seed(recipe.train.seed + step))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            if log_path is not None:
                record = {"step": step, "loss": sum(losses) / len(losses), "lr": max(scheduler.get_last_lr()),
                          "epoch": loader.epoch}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            losses = []
            last = step >= total
            if step % recipe.checkpoint.every_n_steps == 0 or last:
                with tempfile.TemporaryDirectory() as folder:
                    engine.save_checkpoint(folder, tag="state")
                    (Path(folder) / LOADER_STATE.format(rank=rank)).write_text(json.dumps(loader.state_dict()))
                    if rank == 0:
                        (Path(folder) / TRAINER_STATE).write_text(json.dumps(
                            {"step": step, "recipe": recipe.model_dump(mode="json", by_alias=True)}))
                    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))
            if last:
                break


# ------------------------------------------------------------------------------------------ driver


def run_training(recipe: Recipe, *, storage: str | Path, name: str | None = None, world_size: int | None = None,
                 max_failures: int = 0) -> dict[str, Any]:
    """Train one stage on the current Ray cluster (the caller has called `ray.init`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import torch

    cuda = torch.cuda.is_available()
    plan = plan_training(recipe, world_size=world_size, cuda=cuda,
                         bf16_supported=cuda and torch.cuda.is_bf16_supported())
    absent = [n for n in plan.notes if "is not here" in n and "tokenizer" not in n]
    if plan.total_steps is None or absent:
        raise RecipeError(f"recipe {recipe.name}: {'; '.join(absent or plan.notes)}")
    run_name = name or recipe.name
    log_dir = Path(storage) / run_name
    log_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json", by_alias=True), "deepspeed": plan.deepspeed,
            "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch, "log_dir": str(log_dir),
            "cache_dir": str(log_dir / "shard-cache"),
        },
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=cuda,
                                     resources_per_worker=None if cuda else {"CPU": 1}),
        run_config=RunConfig(
            name=run_name, storage_path=str(Path(storage).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    return {"checkpoint": result.checkpoint.path if result.checkpoint else None, "log": str(log_dir / "steps.jsonl"),
            "total_steps": plan.total_steps}


# ------------------------------------------------------------------------------------------ export


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A training checkpoint (DeepSpeed ZeRO shards of every rank) -> the inference layout of
    `xsam.model.export`: the fp32 weights are consolidated (`zero_to_fp32`), loaded strictly into the
    checkpoint's stage model (its recipe is stored in the checkpoint) and written with the tokenizer
    and the provenance (checkpoint, step, recipe name)."""
    import json

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from xsam.model.build import build_xsam, tokenizer_for
    from xsam.model.config import load_model_config
    from xsam.model.export import save_inference

    folder = Path(checkpoint)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file() or not (folder / "state").is_dir():
        raise RecipeError(f"{folder} is not an xsam training checkpoint ({TRAINER_STATE} and state/ expected); "
                          "pass a checkpoint_* folder of a run")
    meta = json.loads(state_file.read_text())
    if "recipe" not in meta:
        raise RecipeError(f"{state_file} holds no recipe (written by an older version); it cannot be exported")
    recipe = Recipe.model_validate(meta["recipe"])
    cfg = load_model_config(recipe.model)
    tokenizer = tokenizer_for(cfg) if "llm" in cfg.stage(recipe.stage).components else None
    model = build_xsam(cfg, stage=recipe.stage, pretrained=False, tokenizer=tokenizer)
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="state")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # ZeRO checkpoints hold parameters only; persistent buffers keep their built values
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise RecipeError(f"{folder}: the checkpoint does not fit the {recipe.stage} model of {recipe.model}: "
                          f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return save_inference(model, cfg, tokenizer, out, stage=recipe.stage, provenance={
        "kind": "training-checkpoint", "checkpoint": str(folder.resolve()), "step": meta["step"],
        "recipe": recipe.name,
    })
