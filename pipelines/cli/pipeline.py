"""`xsam pipeline run|plan FILE.yaml`: a workflow of `xsam` steps with a content cache (`pipelines.runner`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

app = typer.Typer(help="Workflows: convert -> lint -> stage 1 -> 2 -> 3 -> evaluate, each step an xsam command, "
                  "skipped when its inputs are unchanged.", no_args_is_help=True)

STATUS_STYLE = {"ran": "green", "skipped": "cyan", "not-selected": "dim", "failed": "red", "blocked": "yellow"}


def _runner(file: Path, address: Optional[str], start: Optional[str], only: Optional[str], tracking: bool,
            max_parallel: Optional[int] = None):
    from pipelines.runner import Runner
    from pipelines.workflow import WorkflowError, load_workflow

    try:
        workflow = load_workflow(file)
        return Runner(workflow, file, address=address, tracking=tracking, start=start, only=only,
                      console=err_console, max_parallel=max_parallel)
    except WorkflowError as err:
        fail(str(err))


@app.command("plan")
def plan(
    file: Path = typer.Argument(..., help="workflow YAML, e.g. pipelines/quickstart.yaml"),
    start: Optional[str] = typer.Option(None, "--from", help="plan STEP and everything downstream of it"),
    only: Optional[str] = typer.Option(None, "--only", help="plan STEP alone"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of {step, action: run|skip, reason}"),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="plan the commands as `run` with this "
                                  "flag would run them"),
) -> None:
    """Show what `xsam pipeline run` would run and skip now, and why; runs nothing.

    Example: xsam pipeline plan pipelines/quickstart.yaml
    """
    from pipelines.workflow import WorkflowError

    runner = _runner(file, None, start, only, tracking=tracking)
    try:
        decisions = runner.plan()
    except WorkflowError as err:
        fail(str(err))
    if as_json:
        sys.stdout.write(json.dumps([d.to_dict() for d in decisions], indent=2) + "\n")
        return
    table = Table(title=f"workflow {runner.workflow.name} ({file})", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("step", "kind", "action", "why"):
        table.add_column(column, overflow="fold")
    for d in decisions:
        style = "green" if d.action == "run" else "cyan"
        table.add_row(d.step, runner.workflow.steps[d.step].kind, f"[{style}]{d.action}[/]", d.reason)
    out_console.print(table)


@app.command("run")
def run(
    file: Path = typer.Argument(..., help="workflow YAML, e.g. pipelines/quickstart.yaml"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: http://HEAD:8265 submits each step "
                                          "as a Ray Job (shipping this project); HOST:PORT runs the steps here as "
                                          "drivers of that cluster; default: an embedded local Ray"),
    start: Optional[str] = typer.Option(None, "--from", help="run STEP and everything downstream of it (the steps "
                                        "before it must have finished outputs)"),
    only: Optional[str] = typer.Option(None, "--only", help="run STEP alone (what it needs must have finished)"),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="one MLflow parent run with the steps as "
                                  "children (MLFLOW_TRACKING_URI; default: ./mlruns.db)"),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="independent steps at once (default: 1 "
                                               "here, 4 as Ray Jobs)"),
) -> None:
    """Run a workflow: every step whose inputs changed (or that never finished), skipping the rest.

    Example: xsam pipeline run pipelines/quickstart.yaml
    """
    runner = _runner(file, address, start, only, tracking, max_parallel)
    outcomes = runner.run()
    table = Table(title=f"workflow {runner.workflow.name}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("output", overflow="fold")
    for o in outcomes:
        shown = _shown(o.outputs.get("dataset") or o.outputs.get("checkpoint") or "")
        if not shown and o.outputs.get("run_id"):
            shown = f"MLflow run {o.outputs['run_id']}"
        if o.status in ("failed", "blocked"):
            shown = o.reason
        took = f" {o.seconds:.0f} s" if o.status == "ran" else ""
        table.add_row(o.step, f"[{STATUS_STYLE[o.status]}]{o.status}[/]{took}", shown)
    out_console.print(table)
    if runner.parent_run_id:
        out_console.print(f"MLflow run {runner.parent_run_id} (experiment {runner._experiment()}); look at it with "
                          "`xsam ui`", soft_wrap=True, markup=False)
    if any(o.status in ("failed", "blocked") for o in outcomes):
        err_console.print("some steps did not finish: fix the cause and run the same command again; finished steps "
                          "are skipped and unfinished ones resume")
        raise typer.Exit(1)


def _shown(path: str) -> str:
    """A local path below the current directory as a relative one (what the table has room for)."""
    if not path or "://" in path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path
