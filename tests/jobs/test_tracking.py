"""MLflow tracking of the jobs (`jobs/tracking.py`): what is sent, and that an unreachable server
costs the job nothing but a warning: records are kept and sent, once each, when it is back."""

from __future__ import annotations

import logging
import time

import pytest

from jobs.tracking import (
    DIGEST_CHARS, Tracker, TrackingTarget, dataset_input, flatten, redact_uri, scrub, start_run,
)


def test_uris_secrets_and_params_are_prepared_for_mlflow(monkeypatch, caplog) -> None:
    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/x") == "https://***@mlflow.example.com:5000/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-fake")
    with caplog.at_level(logging.WARNING, logger="xsam.tracking"):
        sent = scrub({"data.root": "s3://b/x?key=wJalrXUtnFEMI-fake", "lr": 0.1}, "param")
    assert sent == {"data.root": "s3://b/x?key=***", "lr": "0.1"}
    assert "data.root" in caplog.text and "wJalrXUtnFEMI-fake" not in caplog.text
    assert flatten({"a": {"b": [1, 2], "c": {}}, "d": "x"}) == {"a.b": "[1, 2]", "a.c": "{}", "d": "x"}
    version = "ab" * 32
    entry = dataset_input(name="refcoco", path="/d/refcoco", version=version, context="training", profile={})
    assert entry.dataset.digest == version[:DIGEST_CHARS] and len(entry.dataset.digest) <= 36
    assert {t.key: t.value for t in entry.tags}["xsam.version"] == version


def test_an_unreachable_server_is_told_once_at_run_start(caplog) -> None:
    from conftest import free_port

    target = TrackingTarget(uri=f"http://127.0.0.1:{free_port()}", experiment="nowhere")
    said = []
    assert start_run(target, run_name="x", tags={}, attempts=1, on_error=said.append) is None
    assert len(said) == 1 and "not answering" in said[0] and "not tracked" in said[0]


@pytest.mark.slow
def test_records_made_while_the_server_is_down_are_sent_once_when_it_is_back(mlflow_postgres, caplog) -> None:
    """PostgreSQL store: the run made before the outage is there again after it."""
    from mlflow import MlflowClient

    target = TrackingTarget(uri=mlflow_postgres.uri, experiment="outage")
    run_id = start_run(target, run_name="outage", tags={"xsam.test": "outage"})
    tracker = Tracker(target, run_id, retry_max_s=2.0)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    deadline = time.monotonic() + 60
    while tracker.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracker.pending == 0
    mlflow_postgres.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="xsam.tracking"):
            for step in range(2, 6):
                tracker.log_metrics({"train/loss": float(step)}, step=step)
                time.sleep(0.5)  # the training goes on: logging returns at once
            tracker.set_tags({"xsam.checkpoint": "/runs/x/checkpoint_1"})
            assert tracker.pending >= 5
    finally:
        mlflow_postgres.start()
    assert tracker.close(timeout=120) == 0
    assert caplog.text.count("is not answering") == 1
    client = MlflowClient(tracking_uri=mlflow_postgres.uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 6)]
    assert client.get_run(run_id).data.tags["xsam.checkpoint"] == "/runs/x/checkpoint_1"


@pytest.mark.slow
def test_close_delivers_once_to_a_server_back_within_its_timeout(mlflow_postgres, caplog) -> None:
    """The job ends while the server is down and the sender is in a long backoff: close(timeout) cuts
    the backoff short and retries every second, so everything queued (metrics and the run's end) is
    sent, once, when the server is back within the timeout (it used to sleep through the timeout)."""
    import threading

    from mlflow import MlflowClient

    target = TrackingTarget(uri=mlflow_postgres.uri, experiment="outage-close")
    run_id = start_run(target, run_name="outage-close", tags={})
    tracker = Tracker(target, run_id, retry_min_s=3600.0, retry_max_s=3600.0)  # backoff past any timeout
    tracker.log_metrics({"train/loss": 0.0}, step=0)
    deadline = time.monotonic() + 60
    while tracker.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracker.pending == 0
    left: list[int] = []
    closer = threading.Thread(target=lambda: left.append(tracker.close(timeout=300)), daemon=True)
    mlflow_postgres.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="xsam.tracking"):
            for step in range(1, 4):
                tracker.log_metrics({"train/loss": float(step)}, step=step)
            tracker.terminate("FINISHED")
            deadline = time.monotonic() + 60
            while "is not answering" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "is not answering" in caplog.text  # the sender failed once and now waits an hour
            closer.start()  # the job ends while the server is down
    finally:
        mlflow_postgres.start()
    closer.join(timeout=400)
    assert left == [0]
    client = MlflowClient(tracking_uri=mlflow_postgres.uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(4)]
    assert client.get_run(run_id).info.status == "FINISHED"
