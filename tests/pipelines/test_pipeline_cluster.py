"""A workflow on a real two-node Ray cluster on loopback (head 127.0.0.1 with the Jobs API + a node on
127.0.0.2), every step submitted as a Ray Job, MLflow on PostgreSQL, datasets, checkpoints and step
state in S3 (moto's server). One cluster serves the whole story, run in order:

1. the first run executes every step; the workflow is one MLflow parent run with the steps as children;
2. the second run skips every step;
3. one corpus changes: exactly its conversion and the evaluation that reads it run again;
4. the package sources change (`jobs/`): the stage and the evaluation run again, the conversions not;
   the driver is killed mid-stage (and its Ray job stopped); the re-run resumes the stage from its
   last checkpoint.

The driver runs from a copy of the project's packages (`python -m pipelines.cli` with PYTHONPATH on
the copy), so the test can change "the package sources" without touching the repository; the Ray
Jobs run that copy too (the runtime_env ships it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPORA, REPO
from raycluster import LocalRayCluster

pytestmark = pytest.mark.slow

SECRET_TRACKING = "fake-tracking-password-77"


@pytest.fixture(scope="module")
def world(s3_server, mlflow_postgres, tmp_path_factory):
    import boto3

    from dataprep.examples import make_examples

    root = tmp_path_factory.mktemp("wf")
    project = root / "project"
    for package in ("xsam", "dataprep", "jobs", "pipelines", "configs"):
        shutil.copytree(REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    refcoco = dict(make_examples(CORPORA, root / "examples")["refcoco"])
    bucket = "t-workflow-cluster"
    boto3.client("s3").create_bucket(Bucket=bucket)
    panoptic = CORPORA / "coco_panoptic"
    workflow = {
        "name": "drill",
        "storage": f"s3://{bucket}/wf",
        "experiment": "workflow-drill",
        "vars": {"data": f"s3://{bucket}/wf/data"},
        "steps": {
            "convert-coco-panoptic": {"convert": {
                "corpus": "coco-panoptic", "out": "${data}/coco-panoptic", "options": {"num-workers": 1},
                "inputs": {"images": str(panoptic / "val2017"),
                           "annotations": str(panoptic / "annotations/panoptic_val2017.json"),
                           "masks": str(panoptic / "annotations/panoptic_val2017")}}},
            "convert-refcoco": {"convert": {"corpus": "refcoco", "out": "${data}/refcoco", "inputs": refcoco,
                                            "options": {"num-workers": 1}}},
            "stage": {"needs": ["convert-coco-panoptic"], "train": {
                "recipe": "pipelines/recipes/tiny-stage3.yaml", "num_workers": 1,
                # one item per step: the corpus has one, which the recipe's global batch of 2 would pad with a copy
                "set": {"data.root": "${data}", "data.num_workers": 0, "train.max_steps": 10, "train.epochs": 10,
                        "data.mixture.sources": [{"name": "coco-panoptic", "path": "coco-panoptic", "repeat": "sqrt"}],
                        "data.mixture.batching.global_batch_size": 1,
                        "checkpoint.every_n_steps": 1, "checkpoint.keep_last": 2}}},
            "evaluate": {"needs": ["convert-refcoco"], "evaluate": {
                "checkpoint": "${steps.stage.checkpoint}", "benchmarks": ["refcoco-val"], "data_root": "${data}"}},
        },
    }
    import yaml

    (project / "drill.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False))
    cluster = LocalRayCluster()
    cluster.start_head(num_cpus=2, dashboard=True)
    cluster.add_node("127.0.0.2", num_cpus=1)
    env = {**cluster.env, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": mlflow_postgres.uri,
           "MLFLOW_TRACKING_PASSWORD": SECRET_TRACKING, "XDG_CACHE_HOME": str(root / "cache")}
    yield {"project": project, "cluster": cluster, "env": env, "bucket": bucket, "refcoco": refcoco,
           "mlflow": mlflow_postgres}
    cluster.stop()


def _xsam(world, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=world["project"], env=world["env"],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"xsam {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _plan(world) -> dict[str, dict]:
    return {d["step"]: d for d in json.loads(_xsam(world, "pipeline", "plan", "drill.yaml", "--json").stdout)}


def _run(world, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _xsam(world, "pipeline", "run", "drill.yaml", "--address", world["cluster"].dashboard, *extra, check=check)


def _records(world, step: str) -> list[dict]:
    import boto3

    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=world["bucket"], Prefix=f"wf/pipelines/drill/{step}/").get("Contents", [])
    keys = [o["Key"] for o in listed if o["Key"].endswith(".json") and not o["Key"].endswith(
        (".result.json", "latest.json"))]
    return [json.loads(s3.get_object(Bucket=world["bucket"], Key=k)["Body"].read()) for k in keys]


def _jobs(world) -> list:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(world["cluster"].dashboard).list_jobs()


@pytest.mark.timeout(1200)  # nine Ray Jobs (three trainings, three evaluations) on a 2-core box
def test_workflow_runs_skips_reruns_downstream_and_resumes(world):
    from mlflow import MlflowClient

    steps = ["convert-coco-panoptic", "convert-refcoco", "stage", "evaluate"]
    # 1. everything runs, each step a Ray Job; one MLflow parent run, the steps its children
    assert {d["action"] for d in _plan(world).values()} == {"run"}
    first = _run(world)
    assert first.stderr.count("submitted Ray job") == 4, first.stderr
    for step in steps:
        [record] = _records(world, step)
        assert record["status"] == "succeeded" and record["job_id"].startswith(f"xsam-drill-{step}-")
    jobs = _jobs(world)
    assert len(jobs) == 4 and {j.metadata["xsam.step"] for j in jobs} == set(steps)
    dumped = json.dumps([j.model_dump() for j in jobs], default=str)
    for secret in (SECRET_TRACKING, "testing-secret"):  # neither the tracking password nor the AWS secret
        assert secret not in dumped
    assert all(j.runtime_env.get("py_modules") for j in jobs)  # the project travels with the job
    client = MlflowClient(tracking_uri=world["mlflow"].uri)
    [parent] = client.search_runs([client.get_experiment_by_name("workflow-drill").experiment_id],
                                  "tags.`xsam.kind` = 'workflow'")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["xsam.workflow.step"] for c in children) == sorted(steps)
    assert sorted(c.data.tags["xsam.kind"] for c in children) == ["convert", "convert", "evaluation", "training"]
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "workflow")}
    assert {"workflow/drill.yaml", "workflow/plan.json", "workflow/steps.json"} <= artifacts

    # 2. nothing changed: every step is skipped, nothing is submitted
    assert {d["action"] for d in _plan(world).values()} == {"skip"}
    second = _run(world)
    assert "submitted Ray job" not in second.stderr and second.stderr.count("skipped, cached") == 4
    assert len(_jobs(world)) == 4

    # 3. one corpus changes (a new annotation release with corrected masks): exactly its conversion and the
    # evaluation that reads it run again
    instances = Path(world["refcoco"]["instances"])
    doc = json.loads(instances.read_text())
    for annotation in doc["annotations"]:
        if isinstance(annotation["segmentation"], list):
            annotation["segmentation"] = [[v + 1 if i % 2 == 0 else v for i, v in enumerate(polygon)]
                                          for polygon in annotation["segmentation"]]
    instances.write_text(json.dumps(doc))
    plan = _plan(world)
    assert {s: d["action"] for s, d in plan.items()} == {
        "convert-coco-panoptic": "skip", "convert-refcoco": "run", "stage": "skip", "evaluate": "run"}
    assert "inputs.instances" in plan["convert-refcoco"]["reason"]
    third = _run(world)
    assert third.stderr.count("submitted Ray job") == 2
    assert "--replace" in third.stderr  # the step's own earlier output is replaced, not refused
    assert len(_records(world, "convert-refcoco")) == 2 and len(_records(world, "stage")) == 1
    assert len(_records(world, "evaluate")) == 2

    # 4. the package sources change: the stage and the evaluation depend on jobs/, the conversions do not
    with open(world["project"] / "jobs" / "train.py", "a") as handle:
        handle.write("\n# a change to the package sources\n")
    plan = _plan(world)
    assert {s: d["action"] for s, d in plan.items()} == {
        "convert-coco-panoptic": "skip", "convert-refcoco": "skip", "stage": "run", "evaluate": "run"}
    assert "code.trees.jobs" in plan["stage"]["reason"]
    run_name = f"drill-stage-{plan['stage']['key'][:12]}"
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pipeline", "run", "drill.yaml", "--address",
                               world["cluster"].dashboard], cwd=world["project"], env=world["env"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import boto3

    s3 = boto3.client("s3")
    deadline = time.monotonic() + 300
    seen = 0
    while time.monotonic() < deadline:  # a checkpoint past step 1 in S3 (so Ray Train has recorded an earlier one)
        listed = s3.list_objects_v2(Bucket=world["bucket"], Prefix=f"wf/{run_name}/checkpoint_").get("Contents", [])
        for key in [o["Key"] for o in listed if o["Key"].endswith("/trainer.json")]:
            seen = max(seen, json.loads(s3.get_object(Bucket=world["bucket"], Key=key)["Body"].read())["step"])
        if seen >= 2:
            break
        assert driver.poll() is None, f"the driver ended before the stage checkpointed step 2 (seen: step {seen})"
        time.sleep(0.2)
    else:
        raise AssertionError("the stage wrote no checkpoint")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-stage ...
    driver.wait()
    from ray.job_submission import JobSubmissionClient

    [job] = [j for j in _jobs(world) if j.submission_id.startswith(f"xsam-drill-stage-{plan['stage']['key'][:12]}")]
    JobSubmissionClient(world["cluster"].dashboard).stop_job(job.submission_id)  # ... and takes its job with it
    [record] = [r for r in _records(world, "stage") if r["key"] == plan["stage"]["key"]]
    assert record["status"] == "running"
    resumed = _run(world)
    assert "resumes attempt 1" in resumed.stderr or "resumes after attempt 1" in resumed.stderr
    stage_log = "\n".join(line for line in resumed.stdout.splitlines() if line.startswith("[stage]"))
    assert "continuing from the checkpoint of step" in stage_log, stage_log[-6000:]
    [record] = [r for r in _records(world, "stage") if r["key"] == plan["stage"]["key"]]
    assert record["status"] == "succeeded" and record["attempt"] == 2
    trainer = json.loads(s3.get_object(Bucket=world["bucket"], Key=record["result"]["checkpoint"][len(
        f"s3://{world['bucket']}/"):] + "/trainer.json")["Body"].read())
    assert trainer["step"] == 10
    history = client.get_metric_history(record["result"]["mlflow_run_id"], "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 11))  # one MLflow run through the interruption
    assert {d["action"] for d in _plan(world).values()} == {"skip"}
