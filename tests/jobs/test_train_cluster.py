"""Training on a real multi-node Ray cluster on loopback (head 127.0.0.1 + a node on 127.0.0.2, one
worker each), checkpoints in S3 (moto's server), tracked in MLflow; driven from here with
`--address HOST:PORT` and submitted as a Ray Job with `--address http://...`."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli
from raycluster import LocalRayCluster

pytestmark = pytest.mark.slow

SOURCES = ("[{name: llava, path: llava, repeat: sqrt}, {name: refcoco, path: refcoco, repeat: sqrt}, "
           "{name: reasonseg, path: reasonseg, repeat: sqrt}, {name: coco-vgd, path: coco-vgd, repeat: sqrt}]")


@pytest.fixture()
def cluster(s3_server):
    cluster = LocalRayCluster()
    yield cluster
    cluster.stop()


def _args(task_world, *extra: str) -> list[str]:
    return ["train", str(REPO / "pipelines/recipes/tiny-stage3.yaml"), "--set", f"data.root={task_world['llava'].parent}",
            "--set", f"data.mixture.sources={SOURCES}", "--set", "data.num_workers=0", "--set", "train.max_steps=2",
            "--set", "checkpoint.every_n_steps=1", "--num-workers", "2", *extra]


def test_two_nodes_s3_checkpoints_and_a_submitted_job(cluster, bucket, task_world, mlflow_server, tmp_path):
    import boto3
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    cluster.start_head(num_cpus=1, dashboard=True)
    cluster.add_node("127.0.0.2", num_cpus=1)
    env = {**cluster.env, "MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_EXPERIMENT_NAME": "two-nodes",
           "MLFLOW_TRACKING_PASSWORD": "fake-tracking-password-42"}
    storage = f"s3://{bucket}/runs"
    proc = run_cli(*_args(task_world, "--storage", storage, "--name", "two-nodes", "--address", cluster.address),
                   env=env)
    checkpoint = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("last checkpoint"))
    assert checkpoint.startswith(f"{storage}/two-nodes/checkpoint_")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/two-nodes/")["Contents"]]
    trainer = json.loads(boto3.client("s3").get_object(
        Bucket=bucket, Key=checkpoint[len(f"s3://{bucket}/"):] + "/trainer.json")["Body"].read())
    assert trainer["step"] == 2 and sorted(trainer["nodes"]) == ["127.0.0.1", "127.0.0.2"]  # one rank per node
    assert any(k.endswith("/state/mp_rank_00_model_states.pt") for k in keys)
    run_id = trainer["mlflow_run_id"]
    run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["xsam.checkpoint"] == checkpoint
    # the S3 checkpoint exports for inference
    run_cli("export", checkpoint, "--out", str(tmp_path / "exported"), env=env)
    assert json.loads((tmp_path / "exported" / "xsam.json").read_text())["provenance"]["mlflow_run_id"] == run_id

    # the same command submitted as a Ray Job: --resume RUN_ID continues that run (nothing left to do
    # at max_steps 2, so it raises it to 3); its metadata carries no credential
    submitted = run_cli(*_args(task_world, "--set", "train.max_steps=3", "--storage", storage,
                               "--resume", run_id, "--address", cluster.dashboard), env=env)
    assert "submitted Ray job" in submitted.stderr and "SUCCEEDED" in submitted.stderr
    jobs = JobSubmissionClient(cluster.dashboard).list_jobs()
    dumped = json.dumps([j.dict() if hasattr(j, "dict") else vars(j) for j in jobs], default=str)
    for secret in ("fake-tracking-password-42", "testing-secret"):
        assert secret not in dumped
    steps = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in steps) == [1, 2, 3]
