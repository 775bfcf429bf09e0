"""The training job: one stage of X-SAM (spec §4) from a recipe (`jobs/recipe.py`).

This module holds what the job resolves before any worker starts, which is also what
`xsam train RECIPE --dry-run` prints: the resolved recipe, the model of the stage built on the meta
device (parts, trainable parameters, learning-rate groups), the data mixture and, when its datasets
are at hand, the epoch plan and the number of optimizer steps, the learning-rate schedule's shape
and the DeepSpeed config.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.recipe import Recipe, RecipeError, batch_layout, deepspeed_config, resolve_precision

log = logging.getLogger("xsam.train")


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
        if source.from_.startswith("runs:/"):
            continue  # checked when the run starts, against the tracking server
        if parent_kind(source.from_) is None:
            notes.append(f"init parent {source.from_} is not here (an inference folder with xsam.json, or a "
                         "training checkpoint with trainer.json)")
    missing = [s.path for s in spec.sources if "://" not in s.path and not (Path(s.path) / "manifest.parquet").is_file()]
    if missing:
        notes.append(f"{len(missing)} dataset folders are not here (first: {missing[0]}): no epoch plan; "
                     "convert them or set data.root")
    else:
        sources = open_sources(spec)
        summary = plan_summary(spec, sources)
        mixture["plan"] = summary
        mixture["datasets"] = [
            {"name": s.name, "path": s.spec.path, "version": s.version, "items": s.items,
             "corpus": s.meta.get("corpus"), "records": s.meta.get("totals", {}).get("samples")}
            for s in sources
        ]
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


# ------------------------------------------------------------------------------------------ storage

LOADER_STATE = "loader-rank{rank}.json"
TRAINER_STATE = "trainer.json"
STEPS = "steps.jsonl"
PARENTS = "parents.json"
RUN_STATE = "xsam-run.json"
RNG_STATE = "rng-rank{rank}.json"
STATE_TAG = "state"


@dataclass(frozen=True)
class RunStorage:
    """Where runs and their checkpoints go: a local folder, or `s3://bucket/prefix` with the endpoint
    from `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) for S3-compatible servers. Credentials stay
    with each node's standard AWS variables: pyarrow reads them there, nothing carries them."""

    url: str
    path: str  # inside `fs`
    fs: Any

    @classmethod
    def open(cls, storage: str | Path) -> RunStorage:
        import os
        from urllib.parse import urlsplit

        from pyarrow import fs

        text = str(storage)
        if text.startswith("s3://"):
            kwargs: dict[str, Any] = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                parts = urlsplit(endpoint)
                kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kwargs["region"] = region
            path = text[len("s3://"):].strip("/")
            if not path:
                raise RecipeError(f"--storage {text}: name a bucket, e.g. s3://my-bucket/xsam-runs")
            return cls(url=f"s3://{path}", path=path, fs=fs.S3FileSystem(**kwargs))
        if "://" in text:
            raise RecipeError(f"--storage {text}: expected a local folder or s3://bucket/prefix")
        local = str(Path(text).resolve())
        return cls(url=local, path=local, fs=fs.LocalFileSystem())

    @property
    def remote(self) -> bool:
        return self.url.startswith("s3://")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, path: str) -> str:
        """A path inside `fs` as users write it (s3://... or a local path)."""
        return f"s3://{path}" if self.remote else path

    def exists(self, path: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(path).type != FileType.NotFound

    def read_json(self, path: str) -> Any | None:
        if not self.exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def write_json(self, path: str, doc: Any) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write((json.dumps(doc, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------ worker


def rng_state() -> dict[str, Any]:
    """This process's global random generators (torch CPU and CUDA, numpy, Python) as JSON, for the
    checkpoints: whatever draws from them (dropout, a library's sampling) continues as it would have."""
    import base64
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import base64
    import random

    import numpy as np
    import torch

    def tensor(text: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


@dataclass
class _StepStats:
    """What one optimizer step accumulates on a rank before it is logged."""

    micro: int = 0
    samples: int = 0
    tokens: int = 0
    data_wait: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, losses: dict[str, Any], samples: int, tokens: int) -> None:
        self.micro += 1
        self.samples += samples
        self.tokens += tokens
        for key, value in losses.items():
            self.parts[key] = self.parts.get(key, 0.0) + float(value.detach())


def _restore_folder(stack: Any, config: dict[str, Any]) -> Path | None:
    """The local folder of the checkpoint to continue from: Ray's (same run, after a failure or a
    re-run under the same name) or the one `--resume PATH` named; None for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        source = RunStorage.open(config["resume_from"])
        checkpoint = ray.train.Checkpoint(source.path, filesystem=source.fs)
    if checkpoint is None:
        return None
    return Path(stack.enter_context(checkpoint.as_directory()))


def _to_universal(folder: Path, stack: Any) -> Path:
    """DeepSpeed's universal checkpoint of `folder` (written by another number of workers), in a
    temporary folder: it loads into any data-parallel size."""
    import argparse
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xsam-universal-")))
    to_universal(argparse.Namespace(
        input_folder=str(folder / STATE_TAG), output_folder=str(out / STATE_TAG), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))
    return out


def _snapshot(batch: Any, out: Any, preprocess: Any, step: int) -> Any:
    """ground truth | prediction of the first `<SEG>` of the micro-batch, on the seg input canvas
    (a look at what the model does during training; no extra forward pass)."""
    import numpy as np
    import torch

    from xsam.model.visualize import overlay, side_by_side

    if out.instances is None or len(out.instances) == 0 or out.mask_logits is None:
        return None
    b, seg = int(out.instances.sample[0]), int(out.instances.seg[0])
    h, w = (int(v) for v in batch.scaled_sizes[b])
    mean = torch.tensor(preprocess.seg_mean).view(3, 1, 1)
    std = torch.tensor(preprocess.seg_std).view(3, 1, 1)
    pixels = (batch.seg_pixel_values[b].detach().float().cpu() * std + mean).clamp(0, 1)
    image = (pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8)[:h, :w]
    chosen = batch.mask_segs[b] == seg if seg >= 0 else torch.ones_like(batch.mask_segs[b], dtype=torch.bool)
    truth = batch.masks[b][chosen.to(batch.masks[b].device)].cpu().numpy()[:, :h, :w]
    keep = max(1, min(len(truth), 5))
    scores = out.class_logits[0].detach().float().softmax(-1)[:, :-1].max(-1).values
    top = scores.topk(min(keep, len(scores))).indices
    size = batch.seg_pixel_values.shape[-2:]
    logits = torch.nn.functional.interpolate(out.mask_logits[0, top][None].detach().float(), size=size,
                                             mode="bilinear", align_corners=False)[0]
    predicted = (logits > 0).cpu().numpy()[:, :h, :w]
    panels = [overlay(image, truth, [f"target {i}" for i in range(len(truth))]),
              overlay(image, predicted, [f"query {int(q)}" for q in top], scores=scores[top].tolist())]
    return side_by_side(panels, [f"{batch.keys[b]} ({batch.tasks[b]}): ground truth", f"step {step}: prediction"])


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine over the stage's model, the rank's share of the stream."""
    import contextlib
    import tempfile
    import time

    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from jobs.tracking import Tracker, TrackingTarget, system_metrics
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
    nodes: list[Any] = [None] * world  # which machine each rank runs on, kept in the checkpoints
    node_id = ray.get_runtime_context().get_node_id()
    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), node_id)
    dist.all_gather_object(nodes, address)
    tracker = None
    if rank == 0 and config.get("tracking"):
        tracking = config["tracking"]
        tracker = Tracker(TrackingTarget(uri=tracking["uri"], experiment=tracking["experiment"]), tracking["run_id"])
    stack = contextlib.ExitStack()
    with stack:
        folder = _restore_folder(stack, config)
        saved = json.loads((folder / TRAINER_STATE).read_text()) if folder else None
        ds_config = dict(config["deepspeed"])
        load_from = folder
        if saved is not None and saved.get("world_size", world) != world:
            if rank == 0:
                log.info("restoring a checkpoint of %d workers on %d: converting it to a universal checkpoint",
                         saved["world_size"], world)
            load_from = _to_universal(folder, stack)
            ds_config["checkpoint"] = {"load_universal": True}

        cfg = load_model_config(recipe.model)
        stage = cfg.stage(recipe.stage)
        tokenizer = tokenizer_for(cfg)  # the builder encodes text in every stage; build_xsam uses it for the LLM
        torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
        model = build_xsam(cfg, stage=recipe.stage, tokenizer=tokenizer)
        if recipe.init and saved is None:
            from xsam.model.export import load_parents

            fetched = [fetch_parent(source.from_, Path(stack.enter_context(tempfile.TemporaryDirectory())),
                                    tracking_uri=config.get("tracking_uri")) for source in recipe.init]
            report = load_parents(model, [(folder_, source.include) for (folder_, _), source in zip(fetched, recipe.init)])
            named = {str(folder_): source.from_ for (folder_, _), source in zip(fetched, recipe.init)}
            tensors = report.to_dict()
            tensors["taken"] = {named[k]: v for k, v in tensors["taken"].items()}
            parents_doc = {"parents": [{"from": s.from_, "include": list(s.include), "mlflow_run_id": run}
                                       for s, (_, run) in zip(recipe.init, fetched)], "tensors": tensors}
        else:
            parents_doc = json.loads((folder / PARENTS).read_text()) if folder and (folder / PARENTS).is_file() else None
        if tracker is not None and parents_doc is not None and saved is None:
            tracker.log_text(json.dumps(parents_doc, indent=2), PARENTS)
        torch.manual_seed(recipe.train.seed + rank)
        optimizer = torch.optim.AdamW(
            param_groups(model, stage, lr=recipe.optimizer.lr, weight_decay=recipe.optimizer.weight_decay),
            betas=recipe.optimizer.betas, eps=recipe.optimizer.eps,
        )
        total, per_epoch = config["total_steps"], config["steps_per_epoch"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps=total, steps_per_epoch=per_epoch, recipe=recipe)
        )
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)

        spec = recipe.mixture()
        preprocess = cfg.preprocess_config(recipe.data.preprocess)
        builder = XSamBuilder(
            tokenizer=tokenizer.name_or_path, chat_format=cfg.llm.chat_format, max_length=cfg.llm.max_length,
            preprocess=preprocess, render=RenderOptions(**recipe.data.render), seed=spec.seed,
            micro_batch_size=recipe.train.micro_batch_size,
        )
        loader = StreamLoader(spec, world_size=world, rank=rank, num_workers=recipe.data.num_workers,
                              micro_batch_size=recipe.train.micro_batch_size, builder=builder,
                              cache_dir=config.get("cache_dir"))
        step, history = 0, []
        if folder is not None:
            engine.load_checkpoint(str(load_from), tag=STATE_TAG)
            own = folder / LOADER_STATE.format(rank=rank)
            # another world size restores from any rank's state: checkpoints sit on global-batch boundaries
            loader.load_state_dict(json.loads((own if own.is_file() else folder / LOADER_STATE.format(rank=0))
                                              .read_text()))
            step = saved["step"]
            if rank == 0:
                log.info("continuing from the checkpoint of step %d of %d", step, config["total_steps"])
            rng = folder / RNG_STATE.format(rank=rank)
            if rng.is_file() and saved.get("world_size") == world:  # another world size: the ranks' seeds
                set_rng_state(json.loads(rng.read_text()))
            if rank == 0 and (folder / STEPS).is_file():
                history = [json.loads(line) for line in (folder / STEPS).read_text().splitlines()]

    device = engine.device
    stats = _StepStats()
    step_start = time.perf_counter()
    last_system = 0.0
    every_png = recipe.mlflow.predictions_every_n_steps
    while step < total:
        batches = iter(loader)
        while True:
            waited = time.perf_counter()
            packed = next(batches, None)
            stats.data_wait += time.perf_counter() - waited
            if packed is None:
                break
            batch = packed.to(device)
            # asked before step(): afterwards DeepSpeed answers for the next micro-batch
            boundary = engine.is_gradient_accumulation_boundary()
            lr = max(scheduler.get_last_lr())  # the rate this step applies
            out = engine(batch, generator=torch.Generator(device).manual_seed(recipe.train.seed + step))
            engine.backward(out.loss)
            engine.step()
            stats.add(out.losses, len(batch), int(batch.attention_mask.sum()))
            if not boundary:
                continue
            step += 1
            # the job-wide loss and throughput: one all-reduce of four numbers per optimizer step
            totals = torch.tensor([stats.parts.get("loss", 0.0), stats.micro, stats.samples, stats.tokens],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - step_start
            step_start = time.perf_counter()  # a step's time runs to the next step's end: saves and logging count
            if rank == 0:
                grad_norm = engine.get_global_grad_norm()
                record = {
                    "step": step, "loss": float(totals[0] / totals[1]), "lr": lr,
                    "epoch": loader.epoch, "samples_per_s": float(totals[2]) / elapsed,
                    "tokens_per_s": float(totals[3]) / elapsed, "step_s": elapsed, "data_wait_s": stats.data_wait,
                    "data_wait_share": stats.data_wait / elapsed,
                    **{f"rank0/{k}": v / stats.micro for k, v in stats.parts.items() if k != "loss"},
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                history.append(record)
                if step % recipe.train.log_every_n_steps == 0 or step == total:
                    log.info("step %d/%d loss %.4f lr %.3g, %.2f samples/s, data wait %.1f%%", step, total,
                             record["loss"], record["lr"], record["samples_per_s"], 100 * record["data_wait_share"])
                if tracker is not None:
                    metrics = {("train/" + k): v for k, v in record.items() if k not in ("step",)}
                    metrics.update(loader.metrics())
                    if time.monotonic() - last_system > 10:
                        metrics.update(system_metrics())
                        last_system = time.monotonic()
                    tracker.log_metrics(metrics, step)
                    if every_png and step % every_png == 0:
                        picture = _snapshot(batch, out, preprocess, step)
                        if picture is not None:
                            with tempfile.TemporaryDirectory() as tmp:
                                path = Path(tmp) / f"step-{step:06d}.png"
                                picture.save(path)
                                tracker.log_artifact(path, "predictions")
            stats = _StepStats()
            last = step >= total
            if step % recipe.checkpoint.every_n_steps == 0 or last:
                with tempfile.TemporaryDirectory() as tmp:
                    engine.save_checkpoint(tmp, tag=STATE_TAG)
                    (Path(tmp) / LOADER_STATE.format(rank=rank)).write_text(json.dumps(loader.state_dict()))
                    (Path(tmp) / RNG_STATE.format(rank=rank)).write_text(json.dumps(rng_state()))
                    if rank == 0:
                        (Path(tmp) / TRAINER_STATE).write_text(json.dumps({
                            "step": step, "world_size": world, "nodes": nodes,
                            "recipe": recipe.model_dump(mode="json", by_alias=True),
                            "mlflow_run_id": (config.get("tracking") or {}).get("run_id"),
                        }))
                        (Path(tmp) / STEPS).write_text("".join(json.dumps(r) + "\n" for r in history))
                        if parents_doc is not None:
                            (Path(tmp) / PARENTS).write_text(json.dumps(parents_doc, indent=2))
                    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if last:
                break
    if tracker is not None:
        tracker.close(timeout=recipe.mlflow.flush_timeout_s)


# ------------------------------------------------------------------------------------------ driver

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(kw_only=True)
class TrainingResult:
    run_name: str
    storage: str
    checkpoint: str | None  # URI of the last checkpoint
    steps: list[dict[str, Any]]  # the loss curve (from the last checkpoint: each step once)
    total_steps: int
    mlflow_run_id: str | None
    tracking_uri: str | None  # without credentials

    def to_dict(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "storage": self.storage, "checkpoint": self.checkpoint,
                "total_steps": self.total_steps, "mlflow_run_id": self.mlflow_run_id,
                "tracking_uri": self.tracking_uri, "final_loss": self.steps[-1]["loss"] if self.steps else None}


def resolve_resume(resume: str | None, *, store: RunStorage, run_name: str,
                   tracking: Any | None) -> tuple[RunStorage, str, str | None]:
    """(storage, run name, checkpoint to start from) for `--resume` (see `run_training`)."""
    exists = store.exists(store.join(run_name))
    if resume is None:
        if exists:
            raise RecipeError(f"run {run_name!r} already exists in {store.url}: --resume auto continues it from "
                              "its last checkpoint; --name NEW starts another run")
        return store, run_name, None
    if resume == "auto":
        return store, run_name, None
    if RUN_ID.match(resume):
        if tracking is None:
            raise RecipeError(f"--resume {resume}: an MLflow run id needs MLflow tracking (MLFLOW_TRACKING_URI)")
        from jobs.tracking import client_for

        try:
            tags = client_for(tracking).get_run(resume).data.tags
        except Exception as exc:
            raise RecipeError(f"--resume {resume}: no such run at {tracking.shown()} ({exc})") from None
        if "xsam.storage" not in tags or "xsam.run_name" not in tags:
            raise RecipeError(f"--resume {resume}: that MLflow run was not started by `xsam train`")
        return RunStorage.open(tags["xsam.storage"]), tags["xsam.run_name"], None
    source = RunStorage.open(resume)
    if not source.exists(source.join(TRAINER_STATE)):
        raise RecipeError(f"--resume {resume}: not a checkpoint of `xsam train` ({TRAINER_STATE} missing); "
                          "give auto, an MLflow run id or a checkpoint_* folder")
    if exists:
        raise RecipeError(f"run {run_name!r} already exists in {store.url}: --resume PATH starts a new run from the "
                          "checkpoint; give it a new --name")
    return store, run_name, resume


def _lineage_tags(recipe: Recipe) -> dict[str, str]:
    """Tags naming each init parent and, where the parent came from a tracked run, its run id."""
    tags: dict[str, str] = {}
    run_ids = []
    for i, source in enumerate(recipe.init):
        tags[f"xsam.init.{i}.from"] = source.from_
        tags[f"xsam.init.{i}.include"] = ",".join(source.include)
        run_id = parent_run_id(source.from_)
        if run_id:
            tags[f"xsam.init.{i}.run_id"] = run_id
            run_ids.append(run_id)
    if run_ids:
        tags["xsam.parent_run_ids"] = ",".join(dict.fromkeys(run_ids))
    return tags


# ------------------------------------------------------------------------------------------ parents


def parent_kind(uri: str) -> str | None:
    """"inference" (xsam.json), "checkpoint" (trainer.json) or None, for a local or s3:// folder."""
    store = RunStorage.open(uri)
    if store.exists(store.join("xsam.json")):
        return "inference"
    if store.exists(store.join(TRAINER_STATE)):
        return "checkpoint"
    return None


def parent_run_id(uri: str) -> str | None:
    """The MLflow run that produced a parent: `runs:/ID`, or the run id its xsam.json / trainer.json keeps."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/")[0] or None
    store = RunStorage.open(uri)
    meta = store.read_json(store.join("xsam.json"))
    if meta is not None:
        return (meta.get("provenance") or {}).get("mlflow_run_id")
    return (store.read_json(store.join(TRAINER_STATE)) or {}).get("mlflow_run_id")


def fetch_parent(uri: str, into: Path, *, tracking_uri: str | None) -> tuple[Path, str | None]:
    """A recipe's `init.from` -> (a local inference folder, the MLflow run that made it).

    Local inference folders are used as they are; an s3:// inference folder is downloaded into
    `into`; a training checkpoint (local or s3://) is consolidated there (`export_checkpoint`);
    `runs:/RUN_ID` is that run's last checkpoint (its `xsam.checkpoint` tag)."""
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
        if not tracking_uri:
            raise RecipeError(f"init from {uri}: an MLflow parent needs MLFLOW_TRACKING_URI")
        from mlflow import MlflowClient

        try:
            tags = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags
        except Exception as exc:
            raise RecipeError(f"init from {uri}: no such MLflow run ({exc})") from None
        if not tags.get("xsam.checkpoint"):
            raise RecipeError(f"init from {uri}: the run has no checkpoint (tag xsam.checkpoint): did it finish?")
        folder, _ = fetch_parent(tags["xsam.checkpoint"], into, tracking_uri=tracking_uri)
        return folder, run_id
    kind = parent_kind(uri)
    if kind is None:
        raise RecipeError(f"init from {uri}: neither an inference folder (xsam.json) nor a training checkpoint "
                          f"({TRAINER_STATE})")
    run_id = parent_run_id(uri)
    if kind == "checkpoint":
        return export_checkpoint(uri, into / "parent"), run_id
    if not uri.startswith("s3://"):
        return Path(uri), run_id
    from pyarrow import fs

    store = RunStorage.open(uri)
    (into / "parent").mkdir(parents=True)
    fs.copy_files(store.path, str(into / "parent"), source_filesystem=store.fs,
                  destination_filesystem=fs.LocalFileSystem())
    return into / "parent", run_id


def run_training(recipe: Recipe, *, storage: str | Path, name: str | None = None, world_size: int | None = None,
                 max_failures: int = 0, resume: str | None = "auto", tracking: Any | None = None,
                 parent_run_id: str | None = None, log: Any = print) -> TrainingResult:
    """Train one stage on the current Ray cluster (the caller has called `ray.init`).

    `resume`: None refuses an existing run of that name; "auto" continues it (or starts it); an
    MLflow run id continues the run it tracked; a checkpoint folder (local or s3://) starts a new
    run from it (model, optimizer, scheduler, loader position). `tracking`: a
    `jobs.tracking.TrackingTarget`, or None for no MLflow run. `parent_run_id`: the MLflow run this
    stage belongs under (a pipeline's run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import torch

    from jobs.tracking import Tracker, dataset_input, flatten, start_run

    cuda = torch.cuda.is_available()
    plan = plan_training(recipe, world_size=world_size, cuda=cuda,
                         bf16_supported=cuda and torch.cuda.is_bf16_supported())
    absent = [n for n in plan.notes if "is not here" in n and "tokenizer" not in n]
    if plan.total_steps is None or absent:
        raise RecipeError(f"recipe {recipe.name}: {'; '.join(absent or plan.notes)}")
    store, run_name, resume_from = resolve_resume(resume, store=RunStorage.open(storage),
                                                  run_name=name or recipe.name, tracking=tracking)
    run_state = store.read_json(store.join(run_name, RUN_STATE)) or {}
    run_id = tracker = None
    if tracking is not None:
        tags = {"xsam.kind": "training", "xsam.run_name": run_name, "xsam.storage": store.url,
                "xsam.recipe": recipe.name, "xsam.stage": recipe.stage, "xsam.precision": plan.precision,
                **_lineage_tags(recipe)}
        if resume_from:
            tags["xsam.resumed_from"] = resume_from
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = start_run(tracking, run_name=run_name, tags=tags, run_id=run_state.get("mlflow_run_id"), on_error=log)
    store.write_json(store.join(run_name, RUN_STATE), {
        "run_name": run_name, "recipe": recipe.name, "stage": recipe.stage, "mlflow_run_id": run_id,
        "tracking_uri": tracking.shown() if tracking else None, "resumed_from": resume_from,
    })
    if run_id is not None:
        tracker = Tracker(tracking, run_id)
        if not run_state.get("mlflow_run_id"):  # a new run: what it is made of
            tracker.log_params({**flatten(plan.recipe.model_dump(mode="json", by_alias=True)),
                                "world_size": plan.world_size, "precision": plan.precision,
                                "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
                                "gradient_accumulation_steps": plan.deepspeed["gradient_accumulation_steps"]})
            tracker.log_inputs([dataset_input(name=d["name"], path=d["path"], version=d["version"], context="training",
                                              profile={"items": d["items"], "records": d["records"]})
                                for d in plan.mixture["datasets"]])
            tracker.log_text(json.dumps(plan.deepspeed, indent=2), "deepspeed.json")
        log(f"MLflow run {run_id} at {tracking.shown()} (experiment {tracking.experiment})")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json", by_alias=True), "deepspeed": plan.deepspeed,
            "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "resume_from": resume_from, "cache_dir": str(Path(tempfile.gettempdir()) / "xsam-shard-cache"),
            "tracking": {"uri": tracking.uri, "experiment": tracking.experiment, "run_id": run_id} if run_id else None,
            "tracking_uri": tracking.uri if tracking else None,
        },
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=cuda,
                                     resources_per_worker=None if cuda else {"CPU": 1},
                                     placement_strategy=recipe.train.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=store.path, storage_filesystem=store.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if tracker is not None:
            tracker.terminate("FAILED")
            tracker.close(timeout=30)
        raise
    checkpoint = store.uri(result.checkpoint.path) if result.checkpoint else None
    steps: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            if (Path(folder) / STEPS).is_file():
                steps = [json.loads(line) for line in (Path(folder) / STEPS).read_text().splitlines()]
    if tracker is not None:
        tracker.set_tags({"xsam.checkpoint": checkpoint or ""})
        tracker.log_text(json.dumps({"uri": checkpoint, "step": steps[-1]["step"] if steps else None,
                                     "storage": store.url, "run_name": run_name}, indent=2), "checkpoint.json")
        if steps:
            tracker.log_text("".join(json.dumps(r) + "\n" for r in steps), STEPS)
            with tempfile.TemporaryDirectory() as tmp:
                tracker.log_artifact(loss_curve(steps, Path(tmp) / "loss.png", title=run_name))
        tracker.terminate("FINISHED")
        tracker.close(timeout=recipe.mlflow.flush_timeout_s)
    return TrainingResult(run_name=run_name, storage=store.url, checkpoint=checkpoint, steps=steps,
                          total_steps=plan.total_steps, mlflow_run_id=run_id,
                          tracking_uri=tracking.shown() if tracking else None)


def loss_curve(steps: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """The run's loss (and learning rate) per optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    x = [r["step"] for r in steps]
    ax.plot(x, [r["loss"] for r in steps], color="tab:blue", marker="o" if len(x) < 50 else None, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over the global batch)")
    ax.set_title(title)
    lr = ax.twinx()
    lr.plot(x, [r["lr"] for r in steps], color="tab:orange", alpha=0.6, label="lr")
    lr.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ export


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A training checkpoint (DeepSpeed ZeRO shards of every rank; a local folder or s3://) -> the
    inference layout of `xsam.model.export`: the fp32 weights are consolidated (`zero_to_fp32`),
    loaded strictly into the checkpoint's stage model (its recipe is stored in the checkpoint) and
    written with the tokenizer and the provenance (checkpoint, step, recipe, MLflow run id)."""
    text = str(checkpoint)
    if not text.startswith("s3://"):
        return _export_folder(Path(text), text, out)
    from pyarrow import fs

    source = RunStorage.open(text)
    with tempfile.TemporaryDirectory(prefix="xsam-export-") as tmp:
        fs.copy_files(source.path, tmp, source_filesystem=source.fs, destination_filesystem=fs.LocalFileSystem())
        return _export_folder(Path(tmp), text, out)


def _export_folder(folder: Path, uri: str, out: str | Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from xsam.model.build import build_xsam, tokenizer_for
    from xsam.model.config import load_model_config
    from xsam.model.export import save_inference

    state_file = folder / TRAINER_STATE
    if not state_file.is_file() or not (folder / STATE_TAG).is_dir():
        raise RecipeError(f"{uri} is not an xsam training checkpoint ({TRAINER_STATE} and {STATE_TAG}/ expected); "
                          "pass a checkpoint_* folder of a run")
    meta = json.loads(state_file.read_text())
    if "recipe" not in meta:
        raise RecipeError(f"{state_file} holds no recipe (written by an older version); it cannot be exported")
    recipe = Recipe.model_validate(meta["recipe"])
    cfg = load_model_config(recipe.model)
    tokenizer = tokenizer_for(cfg) if "llm" in cfg.stage(recipe.stage).components else None
    model = build_xsam(cfg, stage=recipe.stage, pretrained=False, tokenizer=tokenizer)
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=STATE_TAG)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # ZeRO checkpoints hold parameters only; persistent buffers keep their built values
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise RecipeError(f"{uri}: the checkpoint does not fit the {recipe.stage} model of {recipe.model}: "
                          f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return save_inference(model, cfg, tokenizer, out, stage=recipe.stage, provenance={
        "kind": "training-checkpoint", "checkpoint": uri if "://" in uri else str(Path(uri).resolve()),
        "step": meta["step"], "recipe": recipe.name, "mlflow_run_id": meta.get("mlflow_run_id"),
    })
