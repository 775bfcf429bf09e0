"""Training recipes (resolution, the paper's trainable sets and lr groups, DeepSpeed configs) and a real
tiny training run: Ray Train workers with DeepSpeed ZeRO on the session's local Ray, CPU/gloo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from builders import LOSS_TOLERANCE, TASK_WORLD_SOURCES, max_relative_loss_difference
from conftest import REPO, run_cli

from jobs.recipe import RecipeError, deepspeed_config, resolve_recipe
from jobs.train import lr_factor, plan_training

RECIPES = REPO / "pipelines" / "recipes"


def _recipe(name: str, *overrides: str):
    return resolve_recipe(RECIPES / f"{name}.yaml", list(overrides), repo_root=REPO)


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "tiny-stage1", "tiny-stage2", "tiny-stage3"])
def test_every_recipe_resolves_and_plans(name) -> None:
    plan = plan_training(_recipe(name))
    assert plan.precision == "fp32"  # CPU
    assert plan.deepspeed["train_batch_size"] == plan.recipe.mixture().batching.global_batch_size
    assert sum(g["parameters"] for g in plan.lr_groups) == sum(c["trainable"] for c in plan.parts.values())


def test_paper_recipes_follow_the_spec() -> None:
    s1, s2, s3 = (plan_training(_recipe(n)) for n in ("stage1", "stage2", "stage3"))
    # stage 1: the segmentor, SAM at lr x 0.1, step decay at epochs 24 and 30, clip 0.01, 64 = 4 x 16
    assert set(s1.parts) == {"seg_encoder", "seg_connector", "decoder", "class_head"}
    assert {g["name"]: (g["lr"], g["parts"]) for g in s1.lr_groups} == {
        "lr_x0.1": (pytest.approx(1e-5), ["seg_encoder"]),
        "lr_x1": (pytest.approx(1e-4), ["seg_connector", "decoder", "class_head"]),
    }
    assert s1.recipe.schedule.kind == "multistep" and s1.recipe.schedule.milestones == (24, 30)
    assert s1.deepspeed["gradient_clipping"] == 0.01 and s1.recipe.train.epochs == 36
    assert s1.recipe.data.preprocess["lsj"] is True
    # stage 2: only the two projectors, no decoder; 256 = 4 x 16 x accumulation 4
    assert [g["parts"] for g in s2.lr_groups] == [["visual_projector", "seg_projector"]]
    assert "decoder" not in s2.parts and s2.deepspeed["gradient_accumulation_steps"] == 4
    assert s2.lr_groups[0]["lr"] == pytest.approx(1e-3) and s2.lr_groups[0]["weight_decay"] == 0
    # stage 3: everything, both encoders at lr x 0.1, the 11-source grouped mixture, ZeRO-2
    groups = {g["name"]: g for g in s3.lr_groups}
    assert sorted(groups["lr_x0.1"]["parts"]) == ["seg_encoder", "vision_encoder"]
    assert groups["lr_x0.1"]["lr"] == pytest.approx(4e-6)
    assert len(s3.recipe.mixture().sources) == 11 and s3.recipe.mixture().batching.mode == "source_grouped"
    assert s3.deepspeed["zero_optimization"]["stage"] == 2
    assert [i.include for i in s3.recipe.init] == [("seg_encoder", "seg_connector", "decoder"),
                                                  ("visual_projector", "seg_projector")]


def test_overrides_extends_and_errors(tmp_path: Path) -> None:
    r = _recipe("tiny-stage3", "optimizer.lr=0.5", "deepspeed.zero_stage=3", "train.max_steps=2")
    assert r.optimizer.lr == 0.5 and r.deepspeed.zero_stage == 3 and r.train.max_steps == 2
    assert r.model == str(REPO / "configs" / "model" / "tiny.yaml")  # from _tiny.yaml, made absolute
    assert deepspeed_config(r, world_size=2, precision="fp32")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(RecipeError, match="optimizer.lrr: unknown key"):
        _recipe("tiny-stage3", "optimizer.lrr=1")
    with pytest.raises(RecipeError, match="not a multiple of micro_batch_size 1 x 3 workers"):
        plan_training(_recipe("tiny-stage3"), world_size=3)
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        plan_training(_recipe("tiny-stage3", "train.precision=fp16"))
    loop = tmp_path / "a.yaml"
    loop.write_text("extends: a.yaml\nname: x\n")
    with pytest.raises(RecipeError, match="loops back"):
        resolve_recipe(loop)


def test_random_generator_states_round_trip_through_json() -> None:
    import random

    import numpy as np
    import torch

    from jobs.train import rng_state, set_rng_state

    state = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])
    set_rng_state(state)
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]) == first


def test_lr_schedule_shapes() -> None:
    r = _recipe("stage3")
    factors = [lr_factor(s, total_steps=100, steps_per_epoch=100, recipe=r) for s in range(100)]
    assert factors[0] == pytest.approx(1e-5) and factors[3] == pytest.approx(1.0)  # 3 % warmup
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[-1] < 0.01
    s1 = _recipe("stage1")
    step = [lr_factor(s, total_steps=3600, steps_per_epoch=100, recipe=s1) for s in (500, 2450, 3050)]
    assert step == [pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.01)]
    assert math.isclose(lr_factor(0, total_steps=10, steps_per_epoch=10, recipe=_recipe("tiny-stage2")), 1e-5)


def _tiny_world_recipe(task_world, *overrides: str):
    """tiny-stage3 over the session's example datasets instead of data/quickstart."""
    root = task_world["llava"].parent
    return _recipe("tiny-stage3", f"data.root={root}", f"data.mixture.sources={TASK_WORLD_SOURCES}", "data.num_workers=0",
                   *overrides)


REFERENCE = ("train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
             "mlflow.predictions_every_n_steps=2")


@pytest.fixture(scope="module")
def reference(ray_session, task_world, mlflow_postgres, tmp_path_factory):
    """One tracked tiny stage-3 run (2 workers, ZeRO-2, 4 steps, checkpoints at 2 and 4) that the tests
    below check, resume, kill a copy of and take parents from."""
    from jobs.tracking import TrackingTarget, client_for, ensure_experiment
    from jobs.train import run_training

    storage = tmp_path_factory.mktemp("train-runs")
    recipe = _tiny_world_recipe(task_world, *REFERENCE)
    tracking = TrackingTarget(uri=mlflow_postgres.uri, experiment="tiny-reference")
    client = client_for(tracking)
    pipeline = client.create_run(ensure_experiment(client, tracking), run_name="pipeline").info.run_id
    result = run_training(recipe, storage=storage, name="reference", world_size=2, tracking=tracking,
                          parent_run_id=pipeline)
    step2 = next(str(p.parent) for p in (storage / "reference").glob("checkpoint_*/trainer.json")
                 if json.loads(p.read_text())["step"] == 2)
    return {"recipe": recipe, "result": result, "tracking": tracking, "storage": storage, "step2": step2,
            "pipeline_run_id": pipeline}


def client_tags(reference) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=reference["tracking"].uri).get_run(reference["result"].mlflow_run_id).data.tags


def _check_checkpoint_exports(result, recipe, out: Path, *, predict: bool) -> None:
    """The last checkpoint holds every rank's state and consolidates into the inference layout, which
    loads (and predicts)."""
    from jobs.train import export_checkpoint
    from xsam.model.export import load_inference

    steps = result.steps
    assert [s["step"] for s in steps] == list(range(1, result.total_steps + 1))
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    checkpoint = Path(result.checkpoint)
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == result.total_steps
    assert {p.name for p in checkpoint.glob("loader-rank*.json")} == {"loader-rank0.json", "loader-rank1.json"}
    assert {p.name for p in checkpoint.glob("rng-rank*.json")} == {"rng-rank0.json", "rng-rank1.json"}
    assert (checkpoint / "state").is_dir()  # DeepSpeed's model/optimizer shards of every rank
    exported = export_checkpoint(checkpoint, out)
    loaded = load_inference(exported)
    assert loaded.meta["provenance"]["step"] == result.total_steps and loaded.stage == "stage3"
    assert loaded.meta["provenance"]["mlflow_run_id"] == result.mlflow_run_id
    if predict:
        proc = run_cli("predict", "--model", recipe.model, "--checkpoint", str(exported), "--image",
                       str(REPO / "examples/corpora/coco_panoptic/val2017/000000439180.jpg"), "--task", "refseg",
                       "--prompt", "a horse", "--out", str(out.parent / "p.png"))
        assert "a horse: score" in proc.stdout


def test_tiny_stage_trains_with_zero2_tracked_in_mlflow(reference, task_world, tmp_path) -> None:
    """A tiny stage 3 on two Ray Train workers (DeepSpeed ZeRO-2, gloo), tracked in MLflow (PostgreSQL
    store); the checkpoint exports to the inference layout, which predicts."""
    _check_tracked_run(reference["tracking"], reference["result"], reference["recipe"], task_world)
    tags = client_tags(reference)
    assert tags["mlflow.parentRunId"] == reference["pipeline_run_id"]  # grouped under the pipeline's run
    _check_checkpoint_exports(reference["result"], reference["recipe"], tmp_path / "exported", predict=True)


def _check_tracked_run(tracking, result, recipe, task_world) -> None:
    """The MLflow run of a finished training: params = the resolved recipe, per-step metrics, the
    datasets with their manifest digests, the checkpoint link, pictures; no credential anywhere."""
    import hashlib
    import os

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_name
    params = run.data.params
    assert float(params["optimizer.lr"]) == recipe.optimizer.lr and params["precision"] == "fp32"
    assert params["deepspeed.zero_stage"] == str(recipe.deepspeed.zero_stage) and params["world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, result.total_steps + 1))  # each step once
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([s["loss"] for s in result.steps])
    for key in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
                "train/data_wait_share", "data/items/refcoco", "data/source_passes/llava",
                "system/cpu_utilization_percentage"):
        assert key in run.data.metrics, key
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"llava", "refcoco", "reasonseg", "coco-vgd"}
    manifest = task_world["refcoco"] / "manifest.parquet"
    version = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert inputs["refcoco"].dataset.digest == version[:32]
    assert {t.key: t.value for t in inputs["refcoco"].tags}["xsam.version"] == version
    tags = run.data.tags
    assert tags["xsam.checkpoint"] == result.checkpoint and tags["xsam.storage"] == result.storage
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.json", "steps.jsonl", "loss.png", "deepspeed.json", "predictions"} <= artifacts
    pictures = [f.path for f in client.list_artifacts(run.info.run_id, "predictions")]
    assert pictures == ["predictions/step-000002.png", "predictions/step-000004.png"]
    secrets = [os.environ[k] for k in ("AWS_SECRET_ACCESS_KEY",) if os.environ.get(k)]
    everything = json.dumps([params, tags])
    assert secrets and not any(s in everything for s in secrets)


def test_train_cli_dry_run_json() -> None:
    proc = run_cli("train", str(RECIPES / "stage2.yaml"), "--dry-run", "--json", "--num-workers", "8")
    doc = json.loads(proc.stdout)
    assert doc["deepspeed"]["gradient_accumulation_steps"] == 8  # 256 = 4 x 8 x 8
    assert doc["total_steps"] is None and any("not here" in n for n in doc["notes"])
    bad = run_cli("train", str(RECIPES / "stage2.yaml"), "--dry-run", "--set", "train.micro_batch_size=3", check=False)
    assert bad.returncode == 2 and "not a multiple" in bad.stderr


@pytest.mark.slow
def test_zero3_run_initialised_from_parents_on_s3_and_in_mlflow(reference, task_world, bucket, tmp_path) -> None:
    """A ZeRO-3 run whose `init:` takes the named parts from each parent: an inference folder on S3,
    and `runs:/ID` (that MLflow run's last training checkpoint, consolidated on the fly). Lineage:
    parents.json in every checkpoint and as an MLflow artifact, the parents' run ids as tags; the
    ZeRO-3 checkpoint exports. A parent that is not there stops the run before any worker starts."""
    import boto3
    import torch
    from mlflow import MlflowClient

    from jobs.train import run_training
    from xsam.model.build import build_xsam
    from xsam.model.config import load_model_config
    from xsam.model.export import save_inference
    from xsam.text import load_tokenizer

    first, tracking = reference["result"], reference["tracking"]
    cfg = load_model_config(REPO / "configs" / "model" / "tiny.yaml")
    torch.manual_seed(5)
    parent = save_inference(build_xsam(cfg, stage="stage1", tokenizer=load_tokenizer(task_world["tokenizer"])), cfg,
                            None, tmp_path / "stage1-parent", stage="stage1")
    s3 = boto3.client("s3")
    for path in parent.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"stage1-parent/{path.relative_to(parent)}")
    init = (f"init=[{{from: 's3://{bucket}/stage1-parent', include: [seg_encoder, decoder]}}, "
            f"{{from: 'runs:/{first.mlflow_run_id}', include: [visual_projector, llm_projector]}}]")
    recipe = _tiny_world_recipe(task_world, "train.max_steps=2", "checkpoint.every_n_steps=2", init,
                                "deepspeed.zero_stage=3")
    result = run_training(recipe, storage=tmp_path / "runs", name="with-parents", world_size=2, tracking=tracking)
    _check_checkpoint_exports(result, recipe, tmp_path / "exported", predict=False)  # ZeRO-3 shards consolidate
    parents = json.loads((Path(result.checkpoint) / "parents.json").read_text())
    assert [(p["from"], p["mlflow_run_id"]) for p in parents["parents"]] == [
        (f"s3://{bucket}/stage1-parent", None), (f"runs:/{first.mlflow_run_id}", first.mlflow_run_id)]
    assert set(parents["tensors"]["taken"]) == {f"s3://{bucket}/stage1-parent", f"runs:/{first.mlflow_run_id}"}
    assert all(n > 0 for n in parents["tensors"]["taken"].values())
    client = MlflowClient(tracking_uri=tracking.uri)
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["xsam.parent_run_ids"] == first.mlflow_run_id and tags["xsam.init.1.run_id"] == first.mlflow_run_id
    assert "parents.json" in {f.path for f in client.list_artifacts(result.mlflow_run_id)}
    missing = _tiny_world_recipe(task_world, f"init=[{{from: {tmp_path / 'nowhere'}, include: [decoder]}}]")
    with pytest.raises(RecipeError, match="nowhere"):
        run_training(missing, storage=tmp_path / "runs", name="no-parent", world_size=2)


def _train_in_thread(**kwargs):
    """run_training in a thread: (thread, box) where box gets 'result' or 'error'."""
    import threading

    from jobs.train import run_training

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = run_training(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _train_worker_pids() -> list[int]:
    """Ray Train workers of THIS test process's Ray (its raylet's children), not another session's."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return pids


@pytest.mark.slow
def test_worker_killed_mid_run_recovers_with_the_same_losses(reference, tmp_path) -> None:
    """SIGKILL one of two training workers after the first checkpoint: Ray Train restarts the group
    from the last registered checkpoint (FailureConfig), and the loss curve equals the uninterrupted
    reference run's step by step within LOSS_TOLERANCE, each step once."""
    import os
    import signal
    import time

    thread, box = _train_in_thread(recipe=reference["recipe"], storage=tmp_path, name="killed", world_size=2,
                                   max_failures=1)
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        if any((tmp_path / "killed").glob("checkpoint_*/trainer.json")):
            pids = _train_worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=400)
    assert killed is not None, "no checkpoint appeared before the run ended"
    assert "error" not in box, box.get("error")
    recovered = box["result"]
    clean = reference["result"]
    assert [s["step"] for s in recovered.steps] == [1, 2, 3, 4]
    assert max_relative_loss_difference(clean.steps, recovered.steps) <= LOSS_TOLERANCE


@pytest.mark.slow
def test_resume_from_a_checkpoint_path_on_another_worker_count(reference, tmp_path) -> None:
    """`--resume PATH` starts a new run from a checkpoint folder (model, optimizer, scheduler, loader
    position): from the reference's step-2 checkpoint, on 2 workers the next steps' losses equal the
    reference's; on 1 worker (a universal checkpoint, the same global batches) they agree within float
    summation order. An existing run name without --resume, and a folder that is not a checkpoint, are
    refused. `--resume RUN_ID` continues a tracked run in place."""
    from jobs.train import run_training

    recipe, full, storage = reference["recipe"], reference["result"], reference["storage"]
    with pytest.raises(RecipeError, match="already exists.*--resume auto"):
        run_training(recipe, storage=storage, name="reference", world_size=2, resume=None)
    with pytest.raises(RecipeError, match="not a checkpoint"):
        run_training(recipe, storage=tmp_path, name="nowhere", world_size=2, resume=str(tmp_path))
    tracking = reference["tracking"]
    same = run_training(recipe, storage=tmp_path, name="from-step2", world_size=2, resume=reference["step2"],
                        tracking=tracking)
    assert [s["step"] for s in same.steps] == [1, 2, 3, 4]
    assert max_relative_loss_difference(full.steps, same.steps) <= LOSS_TOLERANCE
    # --resume MLFLOW_RUN_ID continues that run in place (its storage and name from the run's tags)
    longer = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 5})})
    more = run_training(longer, storage=tmp_path / "elsewhere", world_size=2, resume=same.mlflow_run_id,
                        tracking=tracking)
    assert more.mlflow_run_id == same.mlflow_run_id and more.run_name == "from-step2"
    assert [s["step"] for s in more.steps] == [1, 2, 3, 4, 5]
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=tracking.uri).get_metric_history(same.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in history) == [3, 4, 5]  # steps 1-2 belong to the reference's run
    one = run_training(recipe, storage=tmp_path, name="on-one-worker", world_size=1, resume=reference["step2"])
    assert [s["step"] for s in one.steps] == [1, 2, 3, 4]
    assert max_relative_loss_difference(full.steps, one.steps) <= 1e-4
    assert [s["lr"] for s in one.steps] == pytest.approx([s["lr"] for s in full.steps], rel=1e-9)
