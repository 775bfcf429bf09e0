"""`xsam ui` on what a user's first `xsam pipeline run` leaves in the current directory: the embedded
default store (./mlruns.db, ./mlartifacts), served by a real `mlflow server` sub-process, read through
its REST API and looked at in the real MLflow UI (headless system Chromium, `browser.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from browser import experiment_runs_screenshot
from conftest import CORPORA, free_port, invoke_cli

PANOPTIC = CORPORA / "coco_panoptic"
SERVER_START_S = 120  # `mlflow server` takes 15-50 s to answer on a 2-core machine


def _get(base: str, route: str, **query: str) -> bytes:
    url = f"{base}{route}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def _api(base: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """GET (query) or POST (body) on the tracking server's REST API, as JSON."""
    if body is None:
        return json.loads(_get(base, f"/api/2.0/mlflow/{endpoint}", **query))
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            if _get(base, "/health").strip() == b"OK":
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"xsam ui exited ({proc.returncode}) before answering:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"xsam ui did not answer {base}/health within {SERVER_START_S} s:\n"
                                 f"{log.read_text()}")
        time.sleep(0.5)


def test_xsam_ui_shows_a_first_workflow_run_nested(ray_session, tmp_path, monkeypatch):
    """A user's first workflow run, tracked on the embedded default, then `xsam ui` in the same folder: the
    parent run and its two step runs are in the workflow's experiment, the parent's `workflow/` artifacts are
    readable through the server, and the UI's runs table shows the steps nested under the workflow run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    workflow = tmp_path / "ui-check.yaml"
    workflow.write_text(yaml.safe_dump({
        "name": "ui-check", "experiment": "ui-check", "storage": str(tmp_path / "runs"), "steps": {
            "convert-panoptic": {"convert": {
                "corpus": "coco-panoptic", "out": str(tmp_path / "data/coco-panoptic"),
                "options": {"num-workers": 1},
                "inputs": {"images": str(PANOPTIC / "val2017"),
                           "annotations": str(PANOPTIC / "annotations/panoptic_val2017.json"),
                           "masks": str(PANOPTIC / "annotations/panoptic_val2017")}}},
            "lint": {"lint": {"datasets": ["${steps.convert-panoptic.dataset}"], "verify": "structural"}},
        }}, sort_keys=False))

    invoke_cli("pipeline", "run", str(workflow))
    assert (tmp_path / "mlruns.db").is_file() and (tmp_path / "mlartifacts").is_dir()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "xsam-ui.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "xsam"), "ui", "--port", str(port)],
                                cwd=tmp_path, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(base, proc, log)
        assert f"MLflow UI on {base}" in log.read_text()

        # the workflow's experiment: one parent run, two finished step runs under it
        experiment = _api(base, "experiments/get-by-name", experiment_name="ui-check")["experiment"]
        exp_id = experiment["experiment_id"]
        [parent] = _api(base, "runs/search", {"experiment_ids": [exp_id],
                                              "filter": "tags.`xsam.kind` = 'workflow'"})["runs"]
        parent_id = parent["info"]["run_id"]
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert parent["info"]["run_name"] == "ui-check" and parent["info"]["status"] == "FINISHED"
        assert tags["xsam.step.convert-panoptic"] == "ran" and tags["xsam.step.lint"] == "ran"
        children = _api(base, "runs/search", {"experiment_ids": [exp_id],
                                               "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})["runs"]
        by_name = {c["info"]["run_name"]: c for c in children}
        assert sorted(by_name) == ["convert-panoptic", "lint"], sorted(by_name)
        for name, child in by_name.items():
            child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
            assert child["info"]["status"] == "FINISHED", (name, child["info"])
            assert child_tags["xsam.workflow.step"] == name and tags[f"xsam.step.{name}.run_id"] == child["info"][
                "run_id"]
        lint_metrics = {m["key"]: m["value"] for m in by_name["lint"]["data"]["metrics"]}
        assert lint_metrics == {"datasets": 1.0, "problems": 0.0}

        # the parent's artifacts, through the server (as the UI's Artifacts tab reads them)
        listed = _api(base, "artifacts/list", run_id=parent_id, path="workflow")
        files = {f["path"] for f in listed.get("files", []) if not f.get("is_dir")}
        assert files == {"workflow/ui-check.yaml", "workflow/plan.json", "workflow/steps.json"}, listed
        as_run = _get(base, "/get-artifact", run_id=parent_id, path="workflow/ui-check.yaml").decode()
        assert as_run == workflow.read_text()
        plan = json.loads(_get(base, "/get-artifact", run_id=parent_id, path="workflow/plan.json"))
        assert [(d["step"], d["action"]) for d in plan] == [("convert-panoptic", "run"), ("lint", "run")]
        steps = json.loads(_get(base, "/get-artifact", run_id=parent_id, path="workflow/steps.json"))
        assert {s["step"]: s["status"] for s in steps} == {"convert-panoptic": "ran", "lint": "ran"}
        result = json.loads(_get(base, "/get-artifact", run_id=by_name["convert-panoptic"]["info"]["run_id"],
                                 path="result.json"))
        assert result["kind"] == "convert" and result["corpus"] == "coco-panoptic"

        # the UI: the workflow run's row, expanded, with both steps under it
        shot = tmp_path / "mlflow-ui-check.png"
        text = experiment_runs_screenshot(base, exp_id, shot, expand="ui-check",
                                          expect=["ui-check", "convert-panoptic", "lint"],
                                          tag_columns=["xsam.workflow.step"], timeout_s=90)
        for shown in ("ui-check", "convert-panoptic", "lint", "xsam.workflow.step"):
            assert shown in text, (shown, text[:2000])
        assert "3 matching runs" in text, text[-500:]
        assert shot.stat().st_size > 10_000
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def test_xsam_ui_without_a_store_says_what_to_run(tmp_path, monkeypatch):
    """In a folder where nothing was tracked yet, `xsam ui` starts no server: it names the missing store and
    how to make one (the command only gets that far in-process: on success it execs `mlflow server`)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("ui", "--port", str(free_port()), check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"no tracking store at {tmp_path.resolve() / 'mlruns.db'}" in result.stderr, result.stderr
    assert "make quickstart" in result.stderr, result.stderr
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "mlartifacts").exists()
