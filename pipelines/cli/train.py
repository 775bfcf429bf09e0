"""`xsam train RECIPE`: one X-SAM training stage from a recipe (`pipelines/recipes/*.yaml`, `jobs/recipe.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich import box
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

REPO_ROOT = Path(__file__).resolve().parents[2]


def train(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. pipelines/recipes/tiny-stage3.yaml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe, the model's trainable "
                                 "parts and lr groups, the data plan and the DeepSpeed config; train nothing"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="training workers (default: the recipe's)"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE over the recipe, e.g. optimizer.lr=1e-4"),
    as_json: bool = typer.Option(False, "--json", help="with --dry-run: print JSON"),
    storage: str = typer.Option("runs/train", "--storage", help="where runs and checkpoints go: a folder or "
                                "s3://bucket/prefix (endpoint: AWS_ENDPOINT_URL_S3)"),
    name: Optional[str] = typer.Option(None, "--name", help="run name (default: the recipe's name)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue the run of this name from its last "
                                         "checkpoint (or start it); an MLflow run id: continue that run; a "
                                         "checkpoint folder (local or s3://): a new run starting from it"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: HOST:PORT drives it from here; "
                                          "http://HOST:8265 submits this command as a Ray Job and follows its logs"),
    max_failures: int = typer.Option(0, "--max-failures", help="worker or node failures to recover from (from the "
                                     "last checkpoint) before the run fails"),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="track in MLflow (MLFLOW_TRACKING_URI; "
                                  "default: ./mlruns.db)"),
    parent_run_id: Optional[str] = typer.Option(None, "--parent-run-id", envvar="XSAM_PARENT_RUN_ID",
                                                help="MLflow run this stage belongs under (a pipeline's run)"),
    result_json: Optional[str] = typer.Option(None, "--result-json", help="write the run's outcome (last checkpoint "
                                              "and its id, MLflow run) to this JSON file, local or s3://"),
) -> None:
    """Train one stage of X-SAM from a recipe.

    Example: xsam train pipelines/recipes/stage3.yaml --dry-run --set data.root=/datasets/xsam
    """
    from jobs.recipe import RecipeError, resolve_recipe
    from jobs.train import plan_training

    try:
        resolved = resolve_recipe(recipe, overrides, repo_root=Path.cwd())
        plan = plan_training(resolved, world_size=num_workers)
    except (RecipeError, FileNotFoundError) as err:
        fail(str(err))
    if not dry_run:
        if address and address.startswith(("http://", "https://")):
            from jobs.submit import submit_training

            argv = ["--storage", storage, "--max-failures", str(max_failures)]
            for flag, value in (("--name", name), ("--resume", resume), ("--num-workers", num_workers),
                                ("--parent-run-id", parent_run_id), ("--result-json", result_json)):
                if value is not None:
                    argv += [flag, str(value)]
            if not tracking:
                argv.append("--no-tracking")
            raise typer.Exit(submit_training(address, resolved, argv, err_console))
        _run(resolved, storage=storage, name=name, world_size=num_workers, resume=resume, address=address,
             max_failures=max_failures, tracking=tracking, parent_run_id=parent_run_id, result_json=result_json)
        return
    doc = plan.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    out_console.print(f"[bold]recipe[/] {recipe} (resolved)")
    out_console.print(yaml.safe_dump(doc["recipe"], sort_keys=False), markup=False, highlight=False)
    table = Table(title=f"model: stage {resolved.stage} of {resolved.model}", box=box.SIMPLE_HEAD)
    table.add_column("part", no_wrap=True)
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    for part, counts in plan.parts.items():
        table.add_row(part, f"{counts['total']:,}", f"{counts['trainable']:,}")
    out_console.print(table)
    groups = Table(title="optimizer groups (AdamW)", box=box.SIMPLE_HEAD)
    for column in ("group", "lr", "weight decay", "parts", "parameters"):
        groups.add_column(column)
    for g in plan.lr_groups:
        groups.add_row(g["name"], f"{g['lr']:.3g}", f"{g['weight_decay']:g}", ", ".join(g["parts"]),
                       f"{g['parameters']:,}")
    out_console.print(groups)
    layout = plan.mixture["layout"]
    out_console.print(
        f"batch: global {layout['global_batch_size']} = micro {layout['micro_batch_size']} x "
        f"{layout['world_size']} workers x accumulation {layout['gradient_accumulation_steps']}; "
        f"precision {plan.precision}; ZeRO-{resolved.deepspeed.zero_stage}"
    )
    if plan.total_steps is not None:
        out_console.print(f"steps: {plan.steps_per_epoch} per epoch, {plan.total_steps} in all, "
                          f"{plan.warmup_steps} of warmup")
        for row in plan.mixture["plan"]["sources"]:
            out_console.print(f"  {row['name']}: {row['epoch_items']} items per epoch ({row['passes']:.2f} passes)")
    out_console.print("[bold]DeepSpeed config[/]")
    out_console.print(json.dumps(plan.deepspeed, indent=2), markup=False, highlight=False)
    for note in plan.notes:
        err_console.print(f"note: {note}", markup=False)


def _run(recipe, *, storage: str, name: str | None, world_size: int | None, resume: str | None,
         address: str | None, max_failures: int, tracking: bool, parent_run_id: str | None,
         result_json: str | None = None) -> None:
    """Train on the Ray cluster at `address`, or on an embedded local Ray, then say where to look."""
    import os

    from jobs.recipe import RecipeError
    from jobs.submit import init_ray
    from jobs.tracking import TrackingTarget
    from jobs.train import run_training

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    workers = world_size or recipe.train.num_workers
    started = init_ray(address, num_cpus=max(workers + 1, os.cpu_count() or 1))
    import ray  # after init_ray: it sets what the embedded Ray reads on import

    target = TrackingTarget.from_environment(recipe.mlflow.experiment) if tracking else None
    try:
        result = run_training(recipe, storage=storage, name=name, world_size=workers, resume=resume,
                              max_failures=max_failures, tracking=target, parent_run_id=parent_run_id,
                              log=lambda line: err_console.print(line, markup=False, soft_wrap=True))
    except RecipeError as err:
        fail(str(err))
    finally:
        if started:
            ray.shutdown()
    if result_json:
        from jobs.outcome import checkpoint_id, write_result

        write_result(result_json, {"kind": "train", **result.to_dict(),
                                   "checkpoint_id": checkpoint_id(result.checkpoint) if result.checkpoint else None})
    steps = result.steps
    if steps:
        out_console.print(f"{len(steps)} steps; loss {steps[0]['loss']:.4f} at step {steps[0]['step']} -> "
                          f"{steps[-1]['loss']:.4f} at step {steps[-1]['step']}")
    out_console.print(f"last checkpoint: {result.checkpoint}", soft_wrap=True, markup=False)
    if result.mlflow_run_id:
        out_console.print(f"MLflow run: {result.mlflow_run_id} at {result.tracking_uri}", soft_wrap=True, markup=False)
    out_console.print(f"export for inference: xsam export {result.checkpoint} --out DIR", soft_wrap=True,
                      markup=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def export(
    checkpoint: str = typer.Argument(..., help="a training checkpoint folder (checkpoint_* of a run; local or s3://)"),
    out: Path = typer.Option(..., "--out", help="new inference folder (safetensors + config + tokenizer)"),
) -> None:
    """Consolidate a training checkpoint (DeepSpeed ZeRO shards) into the inference layout that
    `xsam predict` and evaluation read.

    Example: xsam export runs/train/tiny-stage3/checkpoint_2026-11-29_21-08-30.564863 --out models/tiny-stage3
    """
    from jobs.recipe import RecipeError
    from jobs.train import export_checkpoint

    try:
        written = export_checkpoint(checkpoint, out)
    except (RecipeError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    out_console.print(f"wrote {written}", soft_wrap=True, markup=False)
