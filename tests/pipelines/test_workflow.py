"""Workflows on the embedded default: the file's checks, the cache key's parts (git tree hashes,
content fingerprints), and real runs in this process on the session's Ray (conversion, lint, a tiny
stage and its evaluation), their MLflow parent run, failures that stop only their dependants, and
re-runs that skip what is done and resume what is not."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import CORPORA, REPO, invoke_cli

from pipelines.cache import Fingerprints, git_tree_hash
from pipelines.workflow import WorkflowError, downstream, load_workflow, order

PANOPTIC = CORPORA / "coco_panoptic"
POLYGONS = CORPORA / "coco_instances_polygons"


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _convert(corpus: str, out: str, **inputs: str) -> dict:
    return {"convert": {"corpus": corpus, "out": out, "inputs": inputs, "options": {"num-workers": 1}}}


# ------------------------------------------------------------------------------------- the file


def test_a_workflow_file_is_checked_before_anything_runs(tmp_path):
    base = {"name": "w", "vars": {"data": "d"}, "steps": {
        "a": _convert("coco-panoptic", "${data}/a"),
        "b": {"lint": {"datasets": ["${steps.a.dataset}"]}},
        "c": {"needs": ["b"], "evaluate": {"checkpoint": "x", "benchmarks": ["refcoco-val"]}},
    }}
    wf = load_workflow(_write(tmp_path / "ok.yaml", base))
    assert wf.steps["a"].convert.out == "d/a"  # ${var} filled at load time, ${steps.*} kept for run time
    assert order(wf) == ["a", "b", "c"] and downstream(wf, "b") == ["b", "c"]
    bad = {
        "an undefined ${var}": ({"a": _convert("coco-panoptic", "${nope}/a")}, "${nope} is not defined"),
        "two kinds in a step": ({"a": {**_convert("coco-panoptic", "x"), "lint": {"datasets": ["x"]}}},
                                "exactly one of"),
        "an unknown need": ({"a": {**_convert("coco-panoptic", "x"), "needs": ["zz"]}}, "needs 'zz'"),
        "an output the step does not make": (
            {"a": _convert("coco-panoptic", "x"),
             "b": {"evaluate": {"checkpoint": "${steps.a.checkpoint}", "benchmarks": ["refcoco-val"]}}},
            "a convert step makes dataset, version"),
        "a cycle": ({"a": {**_convert("coco-panoptic", "x"), "needs": ["b"]},
                     "b": {**_convert("coco-panoptic", "y"), "needs": ["a"]}}, "cycle: a -> b -> a"),
        "a bad step name": ({"A B": _convert("coco-panoptic", "x")}, "lower-case letters"),
        "an unknown field": ({"a": {"convert": {"corpus": "x", "out": "y", "input": {}}}}, "steps.a.convert.input"),
    }
    for what, (steps, message) in bad.items():
        with pytest.raises(WorkflowError) as err:
            load_workflow(_write(tmp_path / "bad.yaml", {**base, "steps": steps}))
        assert message in str(err.value), f"{what}: {err.value}"


def test_a_step_reading_a_converted_dataset_must_come_after_its_conversion(tmp_path):
    from pipelines.runner import Runner

    steps = {"convert-refcoco": _convert("refcoco", str(tmp_path / "d/refcoco")),
             "evaluate": {"evaluate": {"checkpoint": "x", "benchmarks": ["refcoco-val"], "data_root": str(tmp_path / "d"),
                                       "config": str(REPO / "configs/benchmarks.yaml")}}}
    path = _write(tmp_path / "wf.yaml", {"name": "w", "storage": str(tmp_path / "runs"), "steps": steps})
    with pytest.raises(WorkflowError, match="step evaluate reads .*/d/refcoco, which step convert-refcoco converts: "
                                            "add convert-refcoco to its needs"):
        Runner(load_workflow(path), path)
    steps["evaluate"]["needs"] = ["convert-refcoco"]
    path = _write(tmp_path / "wf.yaml", {"name": "w", "storage": str(tmp_path / "runs"), "steps": steps})
    assert Runner(load_workflow(path), path).order == ["convert-refcoco", "evaluate"]


def test_the_code_version_is_the_git_tree_hash_of_the_package(tmp_path):
    """Hashed as git hashes a tree (nested folders, executable bits, git's name order where a folder
    sorts as NAME/), caches and bytecode left out: equal to what git itself computes."""
    pkg = tmp_path / "repo" / "pkg"
    (pkg / "sub" / "deeper").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "a-b.py").write_text("y = 2\n")
    (pkg / "a").mkdir()
    (pkg / "a" / "inner.yaml").write_text("k: v\n")
    (pkg / "sub" / "deeper" / "data.bin").write_bytes(bytes(range(256)))
    (pkg / "run.sh").write_text("#!/bin/sh\n")
    (pkg / "run.sh").chmod(0o755)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    repo = tmp_path / "repo"
    (repo / ".gitignore").write_text("__pycache__/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    tree = subprocess.run([*git, "write-tree"], check=True, capture_output=True, text=True).stdout.strip()
    expected = subprocess.run([*git, "rev-parse", f"{tree}:pkg"], check=True, capture_output=True, text=True)
    assert git_tree_hash(pkg) == expected.stdout.strip()
    before = git_tree_hash(pkg)
    (pkg / "a.py").write_text("x = 2\n")
    assert git_tree_hash(pkg) != before


def test_inputs_are_fingerprinted_by_content(tmp_path):
    prints = Fingerprints(tmp_path / "cache.sqlite")
    folder = tmp_path / "images"
    shutil.copytree(PANOPTIC / "val2017", folder)
    first = prints.value(str(folder))
    image = next(folder.iterdir())
    image.write_bytes(image.read_bytes())  # rewritten with the same bytes: a new mtime, the same content
    assert prints.value(str(folder)) == first
    assert Fingerprints(tmp_path / "cache.sqlite").value(str(folder)) == first  # the cache outlives the process
    image.write_bytes(image.read_bytes() + b"\0")
    assert prints.value(str(folder)) != first
    image.rename(folder / "renamed.jpg")
    assert prints.value(str(folder)) != first
    assert prints.value("val") == {"value": "val"}  # not a path: the value itself


# ----------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tracked(mlflow_server, ray_session, tmp_path_factory):
    """MLflow at the test server and fingerprints in a temp cache, for this module's in-process runs."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("fp-cache")))
    yield mlflow_server
    mp.undo()


def _plan(path: Path, *extra: str) -> dict[str, dict]:
    return {d["step"]: d for d in json.loads(invoke_cli("pipeline", "plan", str(path), "--json", *extra).stdout)}


def test_a_failed_step_stops_only_its_dependants_and_a_rerun_resumes(tracked, tmp_path):
    """A conversion whose annotation file is missing fails; the lint that needs it is not run; the
    other conversion finishes. With the file back, the re-run skips the finished conversion, runs
    the failed one and then the lint."""
    from mlflow import MlflowClient

    annotations = tmp_path / "instances.json"
    wf = _write(tmp_path / "wf.yaml", {"name": "fail", "storage": str(tmp_path / "runs"), "experiment": "wf-fail",
                                       "steps": {
        "convert-panoptic": _convert("coco-panoptic", str(tmp_path / "data/panoptic"),
                                     images=str(PANOPTIC / "val2017"),
                                     annotations=str(PANOPTIC / "annotations/panoptic_val2017.json"),
                                     masks=str(PANOPTIC / "annotations/panoptic_val2017")),
        "convert-instances": _convert("coco-instances", str(tmp_path / "data/instances"),
                                      images=str(POLYGONS / "val2017"), annotations=str(annotations)),
        "lint": {"lint": {"datasets": ["${steps.convert-instances.dataset}", "${steps.convert-panoptic.dataset}"],
                          "verify": "structural"}},
    }})
    first = invoke_cli("pipeline", "run", str(wf), check=False)
    assert first.returncode == 1
    assert "x convert-instances failed: exit code 2" in first.stderr
    assert "- lint: not run, convert-instances did not finish" in first.stderr
    assert "v convert-panoptic" in first.stderr
    record = json.loads(next((tmp_path / "runs/pipelines/fail/convert-instances").glob("*[0-9a-f].json")).read_text())
    assert record["status"] == "failed" and record["attempt"] == 1
    client = MlflowClient(tracking_uri=tracked.uri)
    [parent] = client.search_runs([client.get_experiment_by_name("wf-fail").experiment_id],
                                  "tags.`xsam.kind` = 'workflow'")
    assert parent.info.status == "FAILED" and parent.data.tags["xsam.step.lint"] == "blocked"

    shutil.copyfile(POLYGONS / "annotations/instances_val2017.json", annotations)
    plan = _plan(wf)
    assert plan["convert-panoptic"]["action"] == "skip"
    assert plan["convert-instances"]["action"] == "run" and "inputs changed" in plan["convert-instances"]["reason"]
    assert plan["lint"]["action"] == "run"
    second = invoke_cli("pipeline", "run", str(wf))
    assert "= convert-panoptic (convert): skipped, cached" in second.stderr
    assert "v convert-instances" in second.stderr and "v lint" in second.stderr
    # the parent run is the same workflow run, carried on after its failure
    [again] = client.search_runs([parent.info.experiment_id], "tags.`xsam.kind` = 'workflow'")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_step = {}
    for child in children:
        by_step.setdefault(child.data.tags["xsam.workflow.step"], []).append(child.info.status)
    assert {step: sorted(statuses) for step, statuses in by_step.items()} == {
        "convert-panoptic": ["FINISHED"], "convert-instances": ["FAILED", "FINISHED"], "lint": ["FINISHED"]}
    result = json.loads(next((tmp_path / "runs/pipelines/fail/lint").glob("*.result.json")).read_text())
    assert result["ok"] and len(result["datasets"]) == 2
    assert {d["action"] for d in _plan(wf).values()} == {"skip"}


@pytest.mark.slow
def test_conversion_stage_and_evaluation_in_process(tracked, tmp_path):
    """The embedded default end to end: convert -> tiny stage 3 -> evaluation, in this process on one
    Ray; the second run skips everything; a hyper-parameter change re-runs the stage and the
    evaluation only; --only and --from select steps."""
    wf_doc = {"name": "local", "storage": str(tmp_path / "runs"), "experiment": "wf-local",
              "vars": {"data": str(tmp_path / "data")}, "steps": {
        "convert-panoptic": _convert("coco-panoptic", "${data}/coco-panoptic", images=str(PANOPTIC / "val2017"),
                                     annotations=str(PANOPTIC / "annotations/panoptic_val2017.json"),
                                     masks=str(PANOPTIC / "annotations/panoptic_val2017")),
        "stage3": {"needs": ["convert-panoptic"], "train": {
            "recipe": str(REPO / "pipelines/recipes/tiny-stage3.yaml"), "num_workers": 1,
            "set": {"data.root": "${data}", "data.num_workers": 0, "train.max_steps": 1,
                    "data.mixture.sources": [{"name": "coco-panoptic", "path": "coco-panoptic", "repeat": "sqrt"}]}}},
        "evaluate": {"evaluate": {"checkpoint": "${steps.stage3.checkpoint}", "benchmarks": ["coco-panoptic-val"],
                                  "config": str(REPO / "configs/benchmarks.yaml"), "data_root": "${data}"}},
    }}
    wf = _write(tmp_path / "wf.yaml", wf_doc)
    first = invoke_cli("pipeline", "run", str(wf))
    assert first.stderr.count("v ") >= 3 and "v evaluate" in first.stderr, first.stderr[-3000:]
    result = json.loads(next((tmp_path / "runs/pipelines/local/evaluate").glob("*.result.json")).read_text())
    assert set(result["scores"]["coco-panoptic-val"]) >= {"PQ"} and result["mlflow_run_id"]
    stage = json.loads(next((tmp_path / "runs/pipelines/local/stage3").glob("*.result.json")).read_text())
    assert stage["checkpoint"].startswith(str(tmp_path / "runs/local-stage3-")) and stage["checkpoint_id"]
    assert (tmp_path / "runs/eval").is_dir()  # evaluation outputs under the workflow's storage
    second = invoke_cli("pipeline", "run", str(wf))
    assert second.stderr.count("skipped, cached") == 3

    wf_doc["steps"]["stage3"]["train"]["set"]["optimizer.lr"] = 5e-4  # one hyper-parameter
    _write(wf, wf_doc)
    plan = _plan(wf)
    assert {s: d["action"] for s, d in plan.items()} == {"convert-panoptic": "skip", "stage3": "run",
                                                          "evaluate": "run"}
    assert "recipe.optimizer.lr" in plan["stage3"]["reason"]
    only = _plan(wf, "--only", "convert-panoptic")
    assert only["convert-panoptic"]["action"] == "skip" and only["stage3"]["reason"] == "not selected (--only convert-panoptic)"
    start = _plan(wf, "--from", "stage3")
    assert start["convert-panoptic"]["action"] == "skip" and start["stage3"]["action"] == "run"
    refused = invoke_cli("pipeline", "run", str(wf), "--only", "evaluate", check=False)
    assert refused.returncode == 1 and "stage3 has no finished output for its current inputs" in refused.stderr


def test_a_conversion_that_makes_the_same_dataset_keeps_what_follows_cached(tracked, tmp_path):
    """Keys downstream come from what a step made, not from its inputs: a new annotation file whose
    change the dataset does not hold (RefCOCO's `info`) re-runs the conversion, which makes the same
    dataset version, so the lint that reads it stays cached. `plan` cannot know that beforehand."""
    from dataprep.examples import make_examples

    refcoco = dict(make_examples(CORPORA, tmp_path / "examples")["refcoco"])
    wf = _write(tmp_path / "wf.yaml", {"name": "same", "storage": str(tmp_path / "runs"), "experiment": "wf-same",
                                       "steps": {
        "convert-refcoco": _convert("refcoco", str(tmp_path / "data/refcoco"), **refcoco),
        "lint": {"lint": {"datasets": ["${steps.convert-refcoco.dataset}"], "verify": "structural"}},
    }})
    invoke_cli("pipeline", "run", str(wf))
    instances = Path(refcoco["instances"])
    instances.write_text(json.dumps({**json.loads(instances.read_text()), "info": {"description": "re-released"}}))
    plan = _plan(wf)
    assert plan["convert-refcoco"]["action"] == "run" and "inputs.instances.sha256" in plan["convert-refcoco"]["reason"]
    assert plan["lint"] == {**plan["lint"], "action": "run", "reason": "after convert-refcoco, which runs first"}
    second = invoke_cli("pipeline", "run", str(wf))
    assert "v convert-refcoco" in second.stderr and "= lint (lint): skipped, cached" in second.stderr
    assert {d["action"] for d in _plan(wf).values()} == {"skip"}
