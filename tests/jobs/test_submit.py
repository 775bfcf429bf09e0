"""Conversions on a real multi-process cluster: submitted as a Ray Job through the dashboard, and
driven across two nodes (127.0.0.1 and 127.0.0.2) writing to S3, with no shared output disk.
"""

from __future__ import annotations

import json

import pytest
from builders import build_panoptic, dataset_files
from conftest import run_cli
from raycluster import LocalRayCluster

pytestmark = pytest.mark.slow


def _convert_args(paths: dict, out: str) -> list[str]:
    args = ["data", "convert", "coco-panoptic", "--out", out, "--shard-max-samples", "2"]
    for name, path in paths.items():
        args += [f"--{name}", str(path)]
    return args


@pytest.fixture()
def cluster(s3_server):
    cluster = LocalRayCluster()  # started after S3 so its workers see the AWS_* endpoint variables
    yield cluster
    cluster.stop()


def test_convert_submitted_as_ray_job(cluster, corpora, tmp_path):
    cluster.start_head(num_cpus=2, dashboard=True)
    paths = build_panoptic(corpora, tmp_path / "coco", 4)
    args = _convert_args(paths, str(tmp_path / "out"))
    proc = run_cli(*args, "--address", cluster.dashboard, env=cluster.env)
    assert "submitted Ray job" in proc.stderr and "SUCCEEDED" in proc.stderr
    assert "records_read 4 == samples 4 + quarantined 0" in proc.stdout  # the job's logs, followed
    info = json.loads(run_cli("data", "info", str(tmp_path / "out"), "--json").stdout)
    assert info["samples"] == 4 and info["shards"] == 2
    run_cli(*_convert_args(paths, str(tmp_path / "local")))  # the same command, locally
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "local")


def test_two_nodes_write_to_s3(cluster, bucket, corpora, tmp_path):
    import boto3

    cluster.start_head(num_cpus=1, dashboard=False)
    cluster.add_node("127.0.0.2", num_cpus=1)  # 2 concurrent tasks of 1 CPU: one runs on each node
    paths = build_panoptic(corpora, tmp_path / "coco", 8)
    url = f"s3://{bucket}/two-nodes"
    run_cli(*_convert_args(paths, url), "--num-workers", "2", "--address", cluster.address, env=cluster.env)
    run_cli(*_convert_args(paths, str(tmp_path / "local")), "--num-workers", "1")
    client = boto3.client("s3")
    remote = {
        o["Key"][len("two-nodes/") :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in client.list_objects_v2(Bucket=bucket)["Contents"]
        if not o["Key"].startswith("two-nodes/logs/")
    }
    assert remote == dataset_files(tmp_path / "local")
