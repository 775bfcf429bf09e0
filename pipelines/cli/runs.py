"""`xsam runs`: read tracked runs back (MLflow), e.g. `xsam runs compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

app = typer.Typer(help="Tracked runs (MLflow): compare evaluation runs against each other and the paper.",
                  no_args_is_help=True)


@app.command("compare")
def compare(
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment of the evaluation runs "
                                             "(default: MLFLOW_EXPERIMENT_NAME, else xsam-eval)"),
    metric: list[str] = typer.Option([], "--metric", help="columns to show: a metric (cIoU), a benchmark "
                                     "(refcoco-val) or one column (refcoco-val/cIoU); repeatable; default: all"),
    paper: bool = typer.Option(True, "--paper/--no-paper", help="add X-SAM's published numbers as a reference row"),
    config: Optional[Path] = typer.Option(None, "--config", help="benchmark file holding the paper's numbers "
                                          "(default: the repository's configs/benchmarks.yaml)"),
    as_csv: bool = typer.Option(False, "--csv", help="print CSV"),
    as_markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table"),
) -> None:
    """One table of evaluation runs x benchmark metrics, newest run first.

    Example: xsam runs compare --metric cIoU --markdown
    """
    from jobs.compare import compare_runs
    from jobs.evaluate import DEFAULT_BENCHMARKS
    from jobs.tracking import TrackingTarget, client_for

    if as_csv and as_markdown:
        fail("choose one of --csv and --markdown")
    target = TrackingTarget.from_environment(experiment or "xsam-eval")
    try:
        table = compare_runs(client_for(target), target.experiment, metrics=metric, paper=paper,
                             config=config or DEFAULT_BENCHMARKS)
    except LookupError as err:
        fail(str(err))
    for note in table.notes:
        err_console.print(f"note: {note}")
    if as_csv:
        print(table.to_csv(), end="")
        return
    if as_markdown:
        print(table.to_markdown(), end="")
        return
    title = f"evaluation runs of {table.experiment} ({target.shown()})"
    cells = table.cells()
    shown = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    if len(table.columns) > len(cells):  # more metrics than runs: one row per metric reads better
        shown.add_column("benchmark / metric")
        for row, line in zip(table.rows, cells):
            shown.add_column(f"{row['run']}\n{line[1]}", justify="right", overflow="fold")
        for k, column in enumerate(table.columns):
            shown.add_row(column, *(line[2 + k] for line in cells))
    else:
        for i, name in enumerate(table.header()):  # "benchmark" over "metric" keeps the columns narrow
            shown.add_column(name.replace("/", "\n", 1) if i >= 2 else name, justify="right" if i >= 2 else "left",
                             overflow="fold")
        for line in cells:
            shown.add_row(*line)
    out_console.print(shown)
