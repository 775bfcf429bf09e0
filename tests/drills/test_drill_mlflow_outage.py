"""Fault drill: the MLflow tracking server is stopped for 30 s in the middle of a training run.

A real tiny training (Ray Train + DeepSpeed on the session's Ray, the example datasets) is tracked
to an MLflow server of its own (PostgreSQL store; `stop()`/`start()` keep its port and store). Once
the first step's metrics have arrived the server (and its database) is stopped for 30 s, then
started again. The promises: the training completes as if nothing happened, and afterwards every
metric the run recorded is in MLflow exactly once per step (no gap, no duplicate), the steps made
while the server was down included, along with the run's params, tags, status and artifacts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from builders import TASK_WORLD_SOURCES
from conftest import REPO

OUTAGE_S = 30.0
# Enough steps that the run is still training well after the server went down (a step of one item is
# ~0.1-0.4 s here); the test fails, rather than passes vacuously, when no step was made during the outage.
STEPS = 150
PICTURES_EVERY = 50


def _recipe(task_world, *overrides: str):
    """tiny-stage3 over the session's example datasets (as tests/jobs/test_train.py's reference)."""
    from jobs.recipe import resolve_recipe

    root = task_world["llava"].parent
    return resolve_recipe(REPO / "pipelines" / "recipes" / "tiny-stage3.yaml",
                          [f"data.root={root}", f"data.mixture.sources={TASK_WORLD_SOURCES}", "data.num_workers=0",
                           *overrides],
                          repo_root=REPO)


def _wait_for(what: str, check, *, alive: threading.Thread, timeout: float = 600.0):
    """Poll `check()` until it returns something truthy; fail if the training ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if not alive.is_alive():
            pytest.fail(f"the training ended before {what}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a training of STEPS steps around a 30 s outage and two server starts, on 2 cores
def test_training_survives_a_30s_mlflow_outage_and_logs_every_metric_once(ray_session, task_world, tmp_path) -> None:
    from mlflow import MlflowClient
    from mlflowserver import LocalMlflowServer

    from jobs.tracking import TrackingTarget
    from jobs.train import run_training

    server = LocalMlflowServer(backend="postgresql")  # its own: the session's server is not stopped
    try:
        server.start()
        tracking = TrackingTarget(uri=server.uri, experiment="outage-drill")
        # one item per step (not the recipe's two): the drill counts steps' metrics, not what a step trains on
        recipe = _recipe(task_world, "train.epochs=100", f"train.max_steps={STEPS}",
                         "data.mixture.batching.global_batch_size=1",
                         f"checkpoint.every_n_steps={STEPS}", "checkpoint.keep_last=1",
                         f"mlflow.predictions_every_n_steps={PICTURES_EVERY}")
        box: dict = {}

        def train() -> None:
            try:
                box["result"] = run_training(recipe, storage=tmp_path / "runs", name="outage", world_size=1,
                                             tracking=tracking)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                box["error"] = exc

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        client = MlflowClient(tracking_uri=server.uri)

        def run_id() -> str | None:
            experiment = client.get_experiment_by_name("outage-drill")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return runs[0].info.run_id if runs else None

        rid = _wait_for("the MLflow run was created", run_id, alive=thread)
        _wait_for("the first metrics arrived", lambda: client.get_metric_history(rid, "train/loss"), alive=thread)
        down_at = time.time()
        server.stop()
        training_when_down = thread.is_alive()
        time.sleep(OUTAGE_S)
        server.start()
        up_at = time.time()
        thread.join(timeout=900)
        assert not thread.is_alive(), "the training did not end"
        assert "error" not in box, f"the training failed: {box.get('error')!r}"
        result = box["result"]
        step_s = sorted(r["step_s"] for r in result.steps)
        print(f"\nserver down {up_at - down_at:.0f} s; a step took {step_s[len(step_s) // 2]:.2f} s (median)")
        assert training_when_down, "the training ended before the server went down: the drill proved nothing"
        assert [s["step"] for s in result.steps] == list(range(1, STEPS + 1))
        assert result.mlflow_run_id == rid

        run = client.get_run(rid)
        assert run.info.status == "FINISHED"
        # every per-step training metric: each step it was recorded at exactly once, with its value
        during_outage: set[int] = set()
        for key in sorted({k for record in result.steps for k in record} - {"step"}):
            history = client.get_metric_history(rid, f"train/{key}")
            expected = {r["step"]: r[key] for r in result.steps if key in r}
            counts = Counter(m.step for m in history)
            assert sorted(counts) == sorted(expected), f"train/{key}: steps missing or extra"
            twice = [s for s, n in counts.items() if n > 1]
            assert not twice, f"train/{key}: steps logged twice: {twice}"
            for m in history:
                assert m.value == pytest.approx(expected[m.step], rel=1e-6, nan_ok=True), (key, m.step)
            during_outage |= {m.step for m in history if down_at * 1000 <= m.timestamp <= up_at * 1000}
        # the loader's counters are logged every step too; no metric (system ones: every ~10 s) twice
        for key in run.data.metrics:
            counts = Counter(m.step for m in client.get_metric_history(rid, key))
            assert max(counts.values()) == 1, f"{key}: steps logged twice"
            if key.startswith("data/") and not key.startswith("data/bad/"):
                assert sorted(counts) == list(range(1, STEPS + 1)), f"{key}: steps missing"
        print(f"{len(during_outage)} of {STEPS} steps were recorded while the server was down")
        assert during_outage, "no step was recorded while the server was down: the outage did not overlap training"

        params, tags = run.data.params, run.data.tags
        assert params["total_steps"] == str(STEPS) and float(params["optimizer.lr"]) == recipe.optimizer.lr
        assert tags["xsam.checkpoint"] == result.checkpoint and tags["xsam.run_name"] == "outage"
        artifacts = {f.path for f in client.list_artifacts(rid)}
        assert {"checkpoint.json", "steps.jsonl", "loss.png", "deepspeed.json"} <= artifacts
        pictures = [f.path for f in client.list_artifacts(rid, "predictions")]
        assert pictures == [f"predictions/step-{s:06d}.png" for s in range(PICTURES_EVERY, STEPS + 1, PICTURES_EVERY)]
    finally:
        server.close()
