"""Credentials reach no log, no MLflow param, tag or artifact, and no file the jobs write.

A workflow (conversion to S3, lint, tracked in an MLflow server) runs in this process with the S3
secret key, a session token and an MLflow password in the environment, as a user's shell holds them.
Then everything the run produced is read back and searched for each secret value: the command's
output, every run's params, tags and metric keys, every artifact, every object written to S3 (shards,
manifests, logs, step records, results). The Ray Job path (metadata, runtime_env) is checked by
tests/pipelines/test_pipeline_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CORPORA, invoke_cli

SECRETS = {
    "AWS_SESSION_TOKEN": "fake-session-token-5f1d2c",
    "MLFLOW_TRACKING_USERNAME": "xsam-jobs",
    "MLFLOW_TRACKING_PASSWORD": "fake-tracking-password-9b7e4a",
}


def test_no_secret_in_logs_mlflow_or_outputs(ray_session, s3_server, mlflow_server, bucket, tmp_path, monkeypatch):
    import os

    import boto3
    from mlflow import MlflowClient

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the S3 key in use (moto accepts any): a value that must not leak either
    secrets = [*SECRETS.values(), os.environ["AWS_SECRET_ACCESS_KEY"]]
    secrets.remove("xsam-jobs")  # a user name is not a secret (MLflow shows it as the run's user)
    panoptic = CORPORA / "coco_panoptic"
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "secrets", "storage": f"s3://{bucket}/wf", "experiment": "secrets",
                                  "steps": {
        "convert": {"convert": {"corpus": "coco-panoptic", "out": f"s3://{bucket}/data/coco-panoptic",
                                "options": {"num-workers": 1},
                                "inputs": {"images": str(panoptic / "val2017"),
                                           "annotations": str(panoptic / "annotations/panoptic_val2017.json"),
                                           "masks": str(panoptic / "annotations/panoptic_val2017")}}},
        "lint": {"lint": {"datasets": ["${steps.convert.dataset}"], "verify": "structural"}},
    }}))
    result = invoke_cli("pipeline", "run", str(wf))
    seen = {"the command's output": result.stdout + result.stderr}

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the workflow and its two steps
    for run in runs:
        seen[f"run {run.info.run_name} params/tags/metrics"] = json.dumps(
            [run.data.params, run.data.tags, sorted(run.data.metrics)])
        local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts" / run.info.run_id))
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            seen[f"artifact {path.relative_to(tmp_path)}"] = path.read_bytes().decode("utf-8", "replace")
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            seen[f"s3 object {obj['Key']}"] = body.decode("latin-1")
    assert any(k.startswith("s3 object wf/pipelines/secrets/lint/") for k in seen)  # the step records were read
    assert any(k.startswith("artifact") for k in seen)
    leaks = [f"{where} holds the value of a credential" for where, text in seen.items()
             for secret in secrets if secret in text]
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("variable", ["AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"])
def test_a_param_holding_a_credential_is_sent_masked(variable, monkeypatch):
    """The last line of defence: a value that holds a credential of the environment is replaced by ***
    before it is sent (jobs.tracking.scrub), e.g. a recipe override that pasted a token into a URL."""
    from jobs.tracking import scrub

    monkeypatch.setenv(variable, SECRETS[variable])
    sent = scrub({"data.root": f"s3://bucket/x?token={SECRETS[variable]}", "lr": 0.1}, "param")
    assert SECRETS[variable] not in json.dumps(sent) and sent["lr"] == "0.1"
