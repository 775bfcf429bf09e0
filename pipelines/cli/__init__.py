"""The `xsam` command: one typer app, sub-commands grouped by noun (`xsam data ...`)."""

from __future__ import annotations

import typer

from pipelines.cli import data, evaluate, model, pipeline, runs, train, ui

app = typer.Typer(
    name="xsam",
    help="xsam-pipeline: build, train and evaluate X-SAM. Example: xsam data list-corpora",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.add_typer(model.app, name="model")
app.add_typer(evaluate.app, name="eval")
app.add_typer(runs.app, name="runs")
app.add_typer(pipeline.app, name="pipeline")
app.command("predict")(model.predict)
app.command("import-official")(model.import_official)
app.command("train")(train.train)
app.command("export")(train.export)
app.command("ui")(ui.ui)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="xsam")
