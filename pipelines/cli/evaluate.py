"""`xsam eval`: score predictions against our shards (`xsam eval score`) and evaluate checkpoints."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

app = typer.Typer(
    help="Evaluate a checkpoint on X-SAM's benchmarks (xsam eval --checkpoint CKPT --benchmarks A,B), or score a "
    "prediction file against a dataset folder's ground truth (xsam eval score).",
)


@app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="an exported inference folder (local or "
                                             "s3://), a training checkpoint, or runs:/RUN_ID (that training run's "
                                             "last checkpoint)"),
    benchmarks: Optional[str] = typer.Option(None, "--benchmarks", help="comma-separated names from the benchmark "
                                             "file, e.g. refcoco-val,coco-panoptic-val"),
    config: Optional[Path] = typer.Option(None, "--config", help="benchmark file (default: the repository's "
                                          "configs/benchmarks.yaml)"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="folder (or s3:// prefix) holding the "
                                            "benchmarks' dataset folders (default: the file's root)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where predictions and scores go (default: "
                                       "runs/eval/<checkpoint name>)"),
    num_actors: int = typer.Option(1, "--num-actors", help="model replicas (Ray actors) predicting in parallel"),
    cpus_per_actor: int = typer.Option(1, "--cpus-per-actor", help="CPUs (torch threads) per actor"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: HOST:PORT drives it from here; "
                                          "http://HOST:8265 submits this command as a Ray Job"),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="track in MLflow (MLFLOW_TRACKING_URI; "
                                  "default: ./mlruns.db)"),
    experiment: str = typer.Option("xsam-eval", "--experiment", help="MLflow experiment (MLFLOW_EXPERIMENT_NAME "
                                   "wins when set)"),
    parent_run_id: Optional[str] = typer.Option(None, "--parent-run-id", envvar="XSAM_PARENT_RUN_ID",
                                                help="MLflow run this evaluation belongs under (a workflow's run)"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as one JSON object {benchmark: {metric: value}}"),
    result_json: Optional[str] = typer.Option(None, "--result-json", help="write the scores, the failures and the "
                                              "MLflow run to this JSON file, local or s3:// (workflow steps read it)"),
) -> None:
    """Evaluate a checkpoint on benchmarks with a Ray actor pool, tracked in MLflow.

    Example: xsam eval --checkpoint runs/export/stage3 --benchmarks refcoco-val,coco-panoptic-val
    """
    if ctx.invoked_subcommand is not None:
        return
    if not checkpoint or not benchmarks:
        err_console.print(ctx.get_help())
        fail("give --checkpoint and --benchmarks (or use `xsam eval score`)")
    from jobs.evaluate import DEFAULT_BENCHMARKS

    names = [n.strip() for n in benchmarks.split(",") if n.strip()]
    if address and address.startswith(("http://", "https://")):
        from jobs.submit import submit_with_files

        argv = ["eval", "--checkpoint", checkpoint, "--benchmarks", ",".join(names), "--config", "benchmarks.yaml",
                "--num-actors", str(num_actors), "--cpus-per-actor", str(cpus_per_actor),
                "--tracking" if tracking else "--no-tracking", "--experiment", experiment]
        for flag, value in (("--data-root", data_root), ("--out", out), ("--parent-run-id", parent_run_id),
                            ("--result-json", result_json)):
            if value:
                argv += [flag, str(value)]
        raise typer.Exit(submit_with_files(address, argv, {"benchmarks.yaml": config or DEFAULT_BENCHMARKS},
                                           err_console))
    from jobs.evaluate import BenchmarkError, EvaluationError, run_evaluation
    from jobs.tracking import TrackingTarget
    from xsam.eval.groundtruth import GroundTruthError
    from xsam.model.export import InferenceLayoutError

    target = TrackingTarget.from_environment(experiment) if tracking else None
    folder = out or Path("runs/eval") / (Path(checkpoint.rstrip("/")).name or "model")
    try:
        # MLflow prints its run links on stdout: keep stdout for the results (--json parses)
        with contextlib.redirect_stdout(sys.stderr):
            result = run_evaluation(checkpoint, names, out=folder, config=config or DEFAULT_BENCHMARKS,
                                    data_root=data_root,
                                    num_actors=num_actors, cpus_per_actor=cpus_per_actor, address=address,
                                    tracking=target, parent_run_id=parent_run_id,
                                    log=lambda m: err_console.print(m, soft_wrap=True))
    except (BenchmarkError, GroundTruthError, InferenceLayoutError, FileNotFoundError) as err:
        fail(str(err))
    except EvaluationError as err:
        fail(str(err), code=1)
    if result_json:
        from jobs.outcome import write_result

        write_result(result_json, {"kind": "evaluate", "checkpoint": checkpoint, "benchmarks": names,
                                   "scores": result.scores, "failures": result.failures, "out": str(result.out),
                                   "mlflow_run_id": result.run_id})
    if as_json:
        print(json.dumps(result.scores, sort_keys=True))
        return
    for name, values in result.scores.items():
        failed = result.failures.get(name, 0)
        note = f", {failed} failed" if failed else ""
        out_console.print(_scores_table(f"{name}{note}", values))
    err_console.print(f"predictions and scores: {result.out}" + (f"; MLflow run {result.run_id}" if result.run_id else ""))


def _scores_table(title: str, scores: dict[str, float]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in scores.items():
        table.add_row(name, f"{value:.2f}")
    return table


@app.command("score")
def score(
    task: str = typer.Option(..., "--task", help="genseg-panoptic|genseg-semantic|genseg-instance, ovseg-* likewise, "
                             "refseg, grefseg, reaseg, gcgseg, intseg, vgdseg"),
    gt: str = typer.Option(..., "--gt", help="dataset folder holding the ground truth (local or s3://)"),
    pred: Path = typer.Option(..., "--pred", help="predictions: COCO results JSON (instance, semantic, vgdseg), "
                              "COCO panoptic PRED.json with its PNGs in PRED/, or a JSON list of "
                              "{key, segmentation} (referring, reasoning, interactive); see docs/evaluation.md"),
    split: Optional[str] = typer.Option(None, "--split", help="split to score (default: the dataset's only "
                                        "non-train split)"),
    prompt_kind: Optional[str] = typer.Option(None, "--prompt-kind", help="intseg / vgdseg: score the items "
                                              "rendered with this prompt kind (point, scribble, box, mask)"),
    text_model: Optional[Path] = typer.Option(None, "--text-model", help="gcgseg: local bert-base-uncased folder "
                                              "for phrase-mask recall (recall is skipped without it)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: task, split, dataset version, "
                                 "counts and scores"),
) -> None:
    """Score a prediction file against the ground truth held in a dataset folder's shards.

    Example: xsam eval score --task refseg --gt data/refcoco --split val --pred preds.json
    """
    from xsam.eval.groundtruth import GroundTruthError, SCORE_TASKS, View
    from xsam.eval.predictions import PredictionError
    from xsam.eval.score import score as run_score

    if task not in SCORE_TASKS:
        fail(f"unknown --task {task!r}; choose one of {', '.join(SCORE_TASKS)}")
    try:
        view = View.from_mapping({"prompt_kind": prompt_kind} if prompt_kind else None, "--prompt-kind")
        report = run_score(task, gt, pred, split=split, view=view, text_model=text_model)
    except (GroundTruthError, PredictionError, FileNotFoundError) as err:
        fail(str(err))
    if report.missing:
        err_console.print(f"[yellow]warning:[/] {len(report.missing)} of {report.samples} samples have no prediction "
                          f"and were scored as empty, e.g. {', '.join(report.missing[:3])}")
    if as_json:
        print(json.dumps(report.to_json(), sort_keys=True))
        return
    out_console.print(_scores_table(f"{task} on {gt} ({report.split}, {report.samples} samples)", report.scores))
