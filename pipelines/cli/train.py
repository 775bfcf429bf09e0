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
    storage: Path = typer.Option(Path("runs/train"), "--storage", help="where runs and checkpoints go (local)"),
    name: Optional[str] = typer.Option(None, "--name", help="run name (default: the recipe's name); the same "
                                       "name and storage again continues that run from its last checkpoint"),
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
        _run(resolved, storage=storage, name=name, world_size=num_workers)
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


def _run(recipe, *, storage: Path, name: str | None, world_size: int | None) -> None:
    """Train on an embedded local Ray (one per command), then print the step losses' ends."""
    import os

    from jobs.recipe import RecipeError
    from jobs.train import run_training

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray on loopback
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    import ray

    workers = world_size or recipe.train.num_workers
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(workers + 1, os.cpu_count() or 1), include_dashboard=False, configure_logging=False)
    try:
        result = run_training(recipe, storage=storage, name=name, world_size=workers)
    except RecipeError as err:
        fail(str(err))
    finally:
        if started:
            ray.shutdown()
    steps = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    if steps:
        out_console.print(f"{len(steps)} steps logged; loss {steps[0]['loss']:.4f} at step {steps[0]['step']} -> "
                          f"{steps[-1]['loss']:.4f} at step {steps[-1]['step']}")
    out_console.print(f"last checkpoint: {result['checkpoint']}", soft_wrap=True, markup=False)
    out_console.print(f"step log: {result['log']}", soft_wrap=True, markup=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def export(
    checkpoint: Path = typer.Argument(..., help="a training checkpoint folder (checkpoint_* of a run)"),
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
