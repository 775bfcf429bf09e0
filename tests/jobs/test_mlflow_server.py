"""The loopback MLflow servers of conftest.py, checked through the client calls the jobs make: an
experiment, a run, params, a metric batch, a proxied artifact and a dataset input, on SQLite and on
PostgreSQL. (A PostgreSQL-backed server stopped and started again keeps its runs: the outage test
of tests/jobs/test_tracking.py.)
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Dataset, DatasetInput, Metric
from mlflow.exceptions import MlflowException


@pytest.fixture(params=["mlflow_server", "mlflow_postgres"])
def server(request):
    return request.getfixturevalue(request.param)


def _new_run(client: mlflow.MlflowClient) -> str:
    experiment = client.create_experiment(f"test-{uuid.uuid4().hex}")
    return client.create_run(experiment).info.run_id


def _dataset(digest: str) -> DatasetInput:
    return DatasetInput(Dataset(name="coco-panoptic", digest=digest, source_type="local", source="/data/coco"))


def test_run_round_trip(server, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_id = _new_run(client)
    client.log_param(run_id, "lr", "0.001")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("loss", 1.0 / (step + 1), now, step) for step in range(3)])
    (tmp_path / "config.yaml").write_text("lr: 0.001\n")
    client.log_artifact(run_id, str(tmp_path / "config.yaml"), "configs")
    digest = str(uuid.uuid4())  # 36 characters, MLflow's limit
    client.log_inputs(run_id, [_dataset(digest)])

    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.001"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest]
    # proxied: the client uploads over HTTP and the server writes its own artifact store
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run_id, "configs")] == ["configs/config.yaml"]
    downloaded = client.download_artifacts(run_id, "configs/config.yaml", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == "lr: 0.001\n"
    assert len(list(Path(server.artifacts).rglob("config.yaml"))) == 1


def test_long_digest_refused(server):
    """The dataset tables' digest column is String(36); the tracking store checks the length itself
    before any SQL, so SQLite (which enforces no lengths) refuses a longer digest as PostgreSQL does."""
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_id = _new_run(client)
    with pytest.raises(MlflowException, match="'digest' exceeds the maximum length of 36") as refused:
        client.log_inputs(run_id, [_dataset("f" * 64)])  # a sha256 hex digest
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert client.get_run(run_id).inputs.dataset_inputs == []
