"""Training on a real multi-node Ray cluster on loopback (head 127.0.0.1 + a node on 127.0.0.2, one
worker each), submitted as a Ray Job with `--address http://...`, checkpoints in S3 (moto's server),
tracked in MLflow."""

from __future__ import annotations

import json

import pytest
from builders import TASK_WORLD_SOURCES
from conftest import REPO, run_cli
from raycluster import LocalRayCluster

pytestmark = pytest.mark.slow



@pytest.fixture()
def cluster(s3_server):
    cluster = LocalRayCluster()
    yield cluster
    cluster.stop()


def _args(task_world, *extra: str) -> list[str]:
    return ["train", str(REPO / "pipelines/recipes/tiny-stage3.yaml"), "--set", f"data.root={task_world['llava'].parent}",
            "--set", f"data.mixture.sources={TASK_WORLD_SOURCES}", "--set", "data.num_workers=0", "--set", "train.max_steps=2",
            "--set", "checkpoint.every_n_steps=1", "--num-workers", "2", *extra]


def test_job_submitted_to_two_nodes_with_s3_checkpoints(cluster, bucket, task_world, mlflow_postgres, tmp_path):
    """`xsam train --address http://...` submits the run as a Ray Job (its metadata carries no
    credential); its two workers run on two nodes, checkpoint to S3 and are tracked in MLflow; the S3
    checkpoint exports for inference, keeping its lineage."""
    import boto3
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    cluster.start_head(num_cpus=1, dashboard=True)
    cluster.add_node("127.0.0.2", num_cpus=1)
    env = {**cluster.env, "MLFLOW_TRACKING_URI": mlflow_postgres.uri, "MLFLOW_EXPERIMENT_NAME": "two-nodes",
           "MLFLOW_TRACKING_PASSWORD": "fake-tracking-password-42"}
    storage = f"s3://{bucket}/runs"
    submitted = run_cli(*_args(task_world, "--set", "train.placement_strategy=STRICT_SPREAD", "--storage", storage,
                               "--name", "two-nodes", "--address", cluster.dashboard), env=env)
    assert "submitted Ray job" in submitted.stderr and "SUCCEEDED" in submitted.stderr
    jobs = JobSubmissionClient(cluster.dashboard).list_jobs()
    dumped = json.dumps([j.model_dump() for j in jobs], default=str)
    assert "recipe.yaml" in dumped
    for secret in ("fake-tracking-password-42", "testing-secret"):
        assert secret not in dumped
    checkpoint = next(line.split(": ", 1)[1] for line in submitted.stdout.splitlines()
                      if line.startswith("last checkpoint"))
    assert checkpoint.startswith(f"{storage}/two-nodes/checkpoint_")
    s3 = boto3.client("s3")
    trainer = json.loads(s3.get_object(Bucket=bucket, Key=checkpoint[len(f"s3://{bucket}/"):] + "/trainer.json")["Body"].read())
    # one rank per node (the head may report the machine's address rather than 127.0.0.1)
    assert trainer["step"] == 2 and len(set(trainer["nodes"])) == 2 and "127.0.0.2" in trainer["nodes"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/two-nodes/")["Contents"]]
    assert any(k.endswith("/state/mp_rank_00_model_states.pt") for k in keys)
    run_id = trainer["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_postgres.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["xsam.checkpoint"] == checkpoint
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2]
    run_cli("export", checkpoint, "--out", str(tmp_path / "exported"), env=env)
    assert json.loads((tmp_path / "exported" / "xsam.json").read_text())["provenance"]["mlflow_run_id"] == run_id
