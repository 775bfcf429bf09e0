"""The evaluation job: a Ray Data actor pool over the benchmarks' units, predictions in the reference formats,
scores through `xsam.eval.score`, one MLflow run with lineage; repeatable and never silently lossy."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, invoke_cli, run_cli

BENCHMARKS = ["refcoco-val", "grefcoco-val", "coco-panoptic-val", "interactive-box-val", "vgd-point-val", "gcg-val"]


def _benchmark_file(eval_world: dict[str, Path], path: Path) -> Path:
    """configs/benchmarks.yaml with its root pointed at the test's converted datasets."""
    doc = yaml.safe_load((REPO / "configs" / "benchmarks.yaml").read_text())
    doc["root"] = str(Path(eval_world["refcoco"]).parent)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, mlflow_server):
    """A random tiny stage-3 model whose provenance names a (real) training run of the tracking server."""
    import torch
    from mlflow import MlflowClient

    from xsam.model.build import build_xsam
    from xsam.model.config import load_model_config
    from xsam.model.export import save_inference
    from xsam.text import build_tiny_tokenizer, load_tokenizer

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment("eval-test-training")
    training = client.create_run(experiment, run_name="stage3-train").info.run_id
    cfg = load_model_config(REPO / "configs" / "model" / "tiny.yaml")
    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))
    torch.manual_seed(0)
    model = build_xsam(cfg, stage="stage3", tokenizer=tokenizer)
    folder = save_inference(model, cfg, tokenizer, tmp_path_factory.mktemp("model") / "tiny-stage3", stage="stage3",
                            provenance={"kind": "test", "mlflow_run_id": training})
    return {"path": folder, "training_run": training}


SECOND = ["refcoco-val", "grefcoco-val", "coco-panoptic-val", "gcg-val"]


@pytest.fixture(scope="module")
def evaluations(ray_session, eval_world, mlflow_server, tiny_model, tmp_path_factory):
    """The tiny model evaluated twice, both runs tracked in one experiment: in this process on six benchmarks
    (under a workflow run), then by a separate `xsam eval --address HOST:PORT --json` process that joins the
    session's Ray head, on four of them. What the repeatability, lineage, compare and UI tests read."""
    from mlflow import MlflowClient

    from jobs.evaluate import run_evaluation
    from jobs.tracking import TrackingTarget

    tmp_path = tmp_path_factory.mktemp("evaluations")
    config = _benchmark_file(eval_world, tmp_path / "benchmarks.yaml")
    target = TrackingTarget(uri=mlflow_server.uri, experiment="eval-test")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    workflow = client.create_run(client.create_experiment("eval-test-workflow"), run_name="workflow").info.run_id
    first = run_evaluation(str(tiny_model["path"]), BENCHMARKS, out=tmp_path / "a", config=config, tracking=target,
                           parent_run_id=workflow, progress=False)
    cli = run_cli("eval", "--checkpoint", str(tiny_model["path"]), "--benchmarks", ",".join(SECOND),
                  "--config", str(config), "--address", ray_session, "--json", "--out", str(tmp_path / "b"),
                  env={"MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_EXPERIMENT_NAME": "eval-test"})
    second_run = re.search(r"MLflow run ([0-9a-f]{32})", cli.stderr).group(1)
    return {"first": first, "second": {"scores": json.loads(cli.stdout), "run_id": second_run, "cli": cli},
            "workflow": workflow, "root": tmp_path, "client": client, "uri": mlflow_server.uri}


def test_evaluation_is_tracked_linked_and_repeatable(evaluations, eval_world, tiny_model):
    first, second, client = evaluations["first"], evaluations["second"], evaluations["client"]
    workflow, tmp_path = evaluations["workflow"], evaluations["root"]

    # every benchmark scored, nothing failed, and the same checkpoint gives the same predictions and scores,
    # whether evaluated here or by `xsam eval` driving the running cluster from another process (whose stdout
    # held nothing but the JSON: progress bars and MLflow's links went to stderr)
    assert set(first.scores) == set(BENCHMARKS) and first.failures == {b: 0 for b in BENCHMARKS}
    assert second["scores"] == {b: pytest.approx(first.scores[b]) for b in SECOND}
    assert set(first.scores["coco-panoptic-val"]) == {"PQ", "mIoU", "AP"}
    assert set(first.scores["grefcoco-val"]) == {"cIoU", "gIoU", "N-acc", "T-acc"}
    assert set(first.scores["gcg-val"]) == {"METEOR", "CIDEr", "AP50", "mIoU"}  # no text model: no recall
    files = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").glob("*/*.json"))
    assert Path("refcoco-val/masks.json") in files and Path("coco-panoptic-val/panoptic.json") in files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    masks = json.loads((tmp_path / "a" / "refcoco-val" / "masks.json").read_text())
    assert [m["key"] for m in masks] == [f"refcoco-val-000000039769#{i}" for i in range(4)]
    assert json.loads((tmp_path / "a" / "scores.json").read_text()) == json.loads(json.dumps(first.scores))

    # the predictions score the same through `xsam eval score`, the command users run on any model's outputs
    proc = run_cli("eval", "score", "--task", "refseg", "--gt", str(eval_world["refcoco"]), "--split", "val",
                   "--pred", str(tmp_path / "a" / "refcoco-val" / "masks.json"), "--json")
    assert json.loads(proc.stdout)["scores"] == pytest.approx(first.scores["refcoco-val"])

    # one MLflow run: child of the workflow, linked to the training run, metrics <benchmark>/<metric>
    run = client.get_run(first.run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == workflow and tags["xsam.training_run_id"] == tiny_model["training_run"]
    assert tags["xsam.kind"] == "evaluation" and run.info.status == "FINISHED"
    for bench, values in first.scores.items():
        for metric, value in values.items():
            assert run.data.metrics[f"{bench}/{metric}"] == pytest.approx(value)
        assert run.data.metrics[f"{bench}/failed"] == 0
    from xsam.data.manifest import version_id
    from xsam.data.storage import open_storage

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == set(BENCHMARKS)
    assert inputs["refcoco-val"].dataset.digest == version_id(open_storage(eval_world["refcoco"]))[:32]
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "plots/refcoco-val")}
    assert "plots/refcoco-val/samples-refseg.png" in artifacts
    panoptic_plots = {a.path for a in client.list_artifacts(first.run_id, "plots/coco-panoptic-val")}
    assert "plots/coco-panoptic-val/per-class-genseg-semantic.png" in panoptic_plots
    assert "scores.json" in {a.path for a in client.list_artifacts(first.run_id)}


def test_a_failing_sample_is_recorded_not_dropped(ray_session, eval_world, tiny_model, tmp_path):
    """A model whose context is too short for the 133-category genseg prompt fails that unit: the failure is
    written with its reason, the unit is scored as an empty prediction, and the other benchmark runs on."""
    from jobs.evaluate import run_evaluation

    short = tmp_path / "short-context"
    shutil.copytree(tiny_model["path"], short)
    cfg = yaml.safe_load((short / "config.yaml").read_text())
    cfg["llm"]["max_length"] = 128
    (short / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = _benchmark_file(eval_world, tmp_path / "benchmarks.yaml")
    result = run_evaluation(str(short), ["coco-panoptic-val", "refcoco-val"], out=tmp_path / "out", config=config,
                            progress=False)
    assert result.failures == {"coco-panoptic-val": 1, "refcoco-val": 0}
    failures = json.loads((tmp_path / "out" / "coco-panoptic-val" / "failures.json").read_text())
    assert [f["unit"] for f in failures] == ["coco-panoptic-val2017-000000439180"]
    assert "128" in failures[0]["error"]  # the reason names the length limit
    assert result.scores["coco-panoptic-val"]["PQ"] == 0.0
    report = next(r for r in result.reports["coco-panoptic-val"] if r.task == "genseg-panoptic")
    assert report.missing == ["439180"]
    assert set(result.scores["refcoco-val"]) == {"cIoU", "gIoU"}


def test_cli_refuses_unknown_benchmarks_before_starting_anything(tiny_model, tmp_path):
    proc = invoke_cli("eval", "--checkpoint", str(tiny_model["path"]), "--benchmarks", "refcoco-val,nope",
                   "--no-tracking", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "unknown benchmark 'nope'" in proc.stderr and "refcoco-val" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_runs_compare_lays_out_runs_against_the_paper(evaluations, mlflow_server):
    first, second = evaluations["first"], evaluations["second"]
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    proc = run_cli("runs", "compare", "--experiment", "eval-test", "--csv", env=env)
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    header, body = rows[0], rows[1:]
    assert header[:2] == ["run", "run_id"] and "refcoco-val/cIoU" in header and "gcg-val/METEOR" in header
    assert not any(h.endswith("/failed") for h in header)
    assert [r[1] for r in body[:2]] == [second["run_id"], first.run_id]  # newest first
    assert body[-1][0] == "X-SAM (paper)" and body[-1][header.index("refcoco-val/cIoU")] == "85.10"
    column = header.index("coco-panoptic-val/PQ")
    assert body[0][column] == f"{first.scores['coco-panoptic-val']['PQ']:.2f}"
    md = run_cli("runs", "compare", "--experiment", "eval-test", "--metric", "cIoU", "--markdown", env=env).stdout
    lines = md.splitlines()
    assert lines[0] == "| run | run_id | grefcoco-val/cIoU | interactive-box-val/cIoU | refcoco-val/cIoU |"
    assert lines[-1].startswith("| X-SAM (paper) |  |  | 75.40 | 85.10 |")
    shown = invoke_cli("runs", "compare", "--experiment", "eval-test", "--metric", "refcoco-val", "--metric",
                       "coco-panoptic-val", env=env).stdout
    # on a terminal, more metrics than runs: one row per metric, one column per run, the paper's last
    assert "benchmark / metric" in shown
    row = next(line.split() for line in shown.splitlines() if line.strip().startswith("refcoco-val/cIoU"))
    assert row == ["refcoco-val/cIoU", *[f"{first.scores['refcoco-val']['cIoU']:.2f}"] * 2, "85.10"]
    missing = run_cli("runs", "compare", "--experiment", "nope", env=env, check=False)
    assert missing.returncode == 2 and "no MLflow experiment 'nope'" in missing.stderr


def test_answer_generates_for_chat_benchmarks(tiny_model, corpora):
    """`Predictor.answer`, what a VLMEvalKit adapter calls: greedy, so the same question gets the same answer."""
    from xsam.model.export import load_inference
    from xsam.model.predict import Predictor

    predictor = Predictor(load_inference(tiny_model["path"]))
    image = (corpora / "coco_panoptic" / "val2017" / "000000439180.jpg").read_bytes()
    first = predictor.answer(image, "How many horses are there?", max_new_tokens=6)
    assert isinstance(first, str) and first == predictor.answer(image, "How many horses are there?", max_new_tokens=6)
    assert first != predictor.answer(image, "How many horses are there?", max_new_tokens=1) or len(first) <= 1
    with pytest.raises(ValueError, match="needs a question"):
        predictor.answer(image, "  ")


def test_mlflow_ui_compare_view_shows_the_evaluation_runs(evaluations, mlflow_server, tmp_path):
    """The MLflow UI's compare view of the two evaluation runs, in headless Chromium: both runs, the
    `<benchmark>/<metric>` rows with the values the UI prints, and a screenshot (docs/images keeps one)."""
    from browser import METRICS_HEADER, compare_runs_screenshot, format_metric
    from PIL import Image

    first, second, client = evaluations["first"], evaluations["second"], evaluations["client"]
    experiment = client.get_experiment_by_name("eval-test").experiment_id
    shown = ["refcoco-val/cIoU", "coco-panoptic-val/PQ", "grefcoco-val/N-acc", "gcg-val/METEOR"]
    out = tmp_path / "mlflow-compare-eval.png"
    text = compare_runs_screenshot(mlflow_server.uri, experiment, [first.run_id, second["run_id"]], out, metrics=shown)
    page, table = text.split(METRICS_HEADER)
    assert first.run_id in page and second["run_id"] in page and "eval-tiny-stage3" in page
    rows = table.strip().splitlines()
    for key in shown:
        bench, _, metric = key.partition("/")
        value = format_metric(first.scores[bench][metric])
        assert f"{key}\t{value}\t{value}" in rows  # the two runs agree: the evaluation is repeatable
    with Image.open(out) as im:
        assert im.width == 1600 and im.height >= 1000
