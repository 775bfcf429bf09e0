"""Fault drill: a Ray worker node lost mid-conversion and mid-training (issue 9).

Issue 9: "A Ray worker node removed mid-conversion and mid-training -> the job completes, output
identical / loss curve within tolerance", asserting nothing is lost or duplicated.

One real multi-node cluster on loopback serves the module (`tests/raycluster.py`): a head on
127.0.0.1 with no CPU, where the drivers (`xsam ... --address HOST:PORT`) and Ray Train's controller
live, and worker nodes with one CPU each on 127.0.0.2, .3, ..., so every conversion task and every
training worker runs on a node that can be lost. A node is removed as a machine loss removes it:
all its processes SIGKILLed at once, no goodbye to the head (`LocalRayCluster.remove_node`); a
replacement node joins afterwards, as an autoscaler or an operator would bring one.

Storage: inputs, the conversion output and the training checkpoints are local folders of this one
machine, which every node sees; they stand for the shared storage (S3, a shared filesystem) a real
cluster needs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import (LOSS_TOLERANCE, TASK_WORLD_SOURCES, build_panoptic, convert_local, dataset_files,
                      max_relative_loss_difference)
from conftest import REPO
from raycluster import LocalRayCluster

from dataprep.convert import ConvertParams
from dataprep.shard_writer import iter_shard
from xsam.data.manifest import DATASET, INDEX, read_parquet
from xsam.data.storage import open_storage

pytestmark = pytest.mark.slow

XSAM = str(Path(sys.executable).parent / "xsam")
RECORDS = 8  # one unit each (--shard-max-samples 1): the loss comes after the first, with 7 to go

TOTAL_STEPS = 8  # a checkpoint every 2 steps: the node goes after the first, with 6 steps to go


@pytest.fixture(scope="module")
def cluster():
    """The head alone; each test adds the worker nodes it needs (`_add_node`)."""
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=0, dashboard=False)
        yield cluster
    finally:
        cluster.stop()


def _add_node(cluster: LocalRayCluster) -> subprocess.Popen:
    """A one-CPU worker node on the next unused loopback address (the head is 127.0.0.1)."""
    return cluster.add_node(f"127.0.0.{len(cluster.procs) + 1}", num_cpus=1)


def _alive_nodes(cluster: LocalRayCluster) -> list[subprocess.Popen]:
    return [p for p in cluster.procs[1:] if p not in cluster.removed and p.poll() is None]


def _start(args: list[str], cluster: LocalRayCluster, log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen([XSAM, *args], env=cluster.env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """The driver's exit status, or None (and the driver killed) when it did not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_node_lost_mid_conversion_output_identical(cluster, corpora, tmp_path):
    """The node running the conversion's units dies after the first unit's completion record: the
    units it held are retried as system failures (the task's `max_retries`), on a replacement node;
    the job exits 0 with a folder byte-identical to an uninterrupted conversion, every record once."""
    inputs = build_panoptic(corpora, tmp_path / "in", RECORDS)
    params = ConvertParams(shard_max_samples=1)
    reference = convert_local("coco-panoptic", tmp_path / "reference", inputs, params)
    doomed = _add_node(cluster)
    out, log = tmp_path / "out", tmp_path / "driver.log"
    args = ["data", "convert", "coco-panoptic", "--out", str(out), "--shard-max-samples", "1",
            "--address", cluster.address, *[a for name, path in inputs.items() for a in (f"--{name}", str(path))]]
    driver = _start(args, cluster, log)
    units = out / "_work" / "units"
    deadline = time.monotonic() + 300
    try:
        while not (units.is_dir() and any(units.glob("*.json"))):
            assert driver.poll() is None, f"the conversion ended before its first unit:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no unit completed in 300 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        assert driver.poll() is None, "the conversion ended before the node was removed"
        cluster.remove_node(doomed)
        done_at_loss = len(list(units.glob("*.json")))  # nothing completes while no node has a CPU
        _add_node(cluster)  # the replacement
        rc = _finish(driver, timeout=420)
    finally:
        _finish(driver, timeout=0)
    output = log.read_text(errors="replace")
    assert rc == 0, f"the conversion failed ({rc}):\n{output[-6000:]}"
    assert 1 <= done_at_loss < RECORDS, done_at_loss  # the node went mid-run
    # a unit was running there when it died, and Ray retried it as a system failure
    assert re.search(r"_remote_run_unit failed\. There are \d+ retries remaining, so the task will be retried\. "
                     r"Error: Task failed because the node it was running on is dead", output), output[-6000:]
    assert dataset_files(out) == dataset_files(reference)
    # nothing lost or duplicated: every record once in the index, in the shards and in the totals
    keys = [row["key"] for row in read_parquet(open_storage(out), INDEX)]
    assert len(keys) == len(set(keys)) == RECORDS
    in_shards = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with open(shard, "rb") as handle:
            in_shards += [key for key, _ in iter_shard(handle)]
    assert sorted(in_shards) == sorted(keys)
    totals = json.loads((out / DATASET).read_text())["totals"]
    assert totals["records_read"] == totals["samples"] == RECORDS and totals["quarantined"] == 0
    assert not (out / "_work").exists()


def _train_args(task_world, storage: Path, name: str, address: str, *extra: str) -> list[str]:
    """The tiny stage-3 recipe of tests/jobs/test_train.py over the session's example datasets, two
    workers, no MLflow (the MLflow drill is elsewhere)."""
    return ["train", str(REPO / "pipelines/recipes/tiny-stage3.yaml"), "--set", f"data.root={task_world['llava'].parent}",
            "--set", f"data.mixture.sources={TASK_WORLD_SOURCES}", "--set", "data.num_workers=0",
            "--set", f"train.max_steps={TOTAL_STEPS}", "--set", "checkpoint.every_n_steps=2",
            "--set", "checkpoint.keep_last=2", "--num-workers", "2", "--no-tracking", "--storage", str(storage),
            "--name", name, "--address", address, "--result-json", str(storage / f"{name}.json"), *extra]


def _steps(storage: Path, name: str) -> tuple[list[dict], dict]:
    """The run's loss curve (steps.jsonl of its last checkpoint) and that checkpoint's trainer.json."""
    checkpoint = Path(json.loads((storage / f"{name}.json").read_text())["checkpoint"])
    steps = [json.loads(line) for line in (checkpoint / "steps.jsonl").read_text().splitlines()]
    return steps, json.loads((checkpoint / "trainer.json").read_text())


def _registered_checkpoint(run: Path) -> str | None:
    """The newest checkpoint Ray Train's controller has registered (it resumes from that one, not
    from a newer one still being reported), from the snapshot its checkpoint manager keeps in the run
    folder (Ray 2.60's `checkpoint_manager_snapshot.json`)."""
    try:
        latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return None
    return latest["checkpoint_dir_name"] if latest else None


@pytest.mark.timeout(1500)  # two tiny trainings and a node loss on a 2-core box
def test_node_lost_mid_training_resumes_with_the_same_losses(cluster, task_world, tmp_path):
    """Two training workers on two nodes; the node of rank 0 dies once Ray Train has registered the
    first checkpoint: Ray Train (`--max-failures 1`) restarts the worker group on the surviving node
    and a replacement from that checkpoint; the run completes, every step once in its loss curve,
    which equals an uninterrupted run's on the same cluster within LOSS_TOLERANCE."""
    while len(_alive_nodes(cluster)) < 2:
        _add_node(cluster)
    storage = tmp_path / "runs"
    reference = subprocess.run([XSAM, *_train_args(task_world, storage, "reference", cluster.address)],
                               env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, f"{reference.stdout[-3000:]}\n{reference.stderr[-6000:]}"
    clean, clean_trainer = _steps(storage, "reference")
    assert [s["step"] for s in clean] == list(range(1, TOTAL_STEPS + 1)) and len(set(clean_trainer["nodes"])) == 2

    log = tmp_path / "drill.log"
    driver = _start(_train_args(task_world, storage, "drill", cluster.address, "--max-failures", "1"), cluster, log)
    deadline = time.monotonic() + 600
    try:
        while (registered := _registered_checkpoint(storage / "drill")) is None:
            assert driver.poll() is None, f"the run ended before a checkpoint was registered:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no checkpoint registered in 600 s:\n{log.read_text()[-6000:]}"
            time.sleep(0.1)
        at_loss = json.loads((storage / "drill" / registered / "trainer.json").read_text())
        by_ip = {getattr(p, "ip"): p for p in _alive_nodes(cluster)}
        lost_ip = at_loss["nodes"][0]
        assert lost_ip in by_ip, f"rank 0 runs on {lost_ip}, not on a worker node of {sorted(by_ip)}"
        assert driver.poll() is None, "the run ended before the node was removed"
        cluster.remove_node(by_ip[lost_ip])
        replacement = _add_node(cluster)
        rc = _finish(driver, timeout=900)
    finally:
        _finish(driver, timeout=0)
    output = log.read_text(errors="replace")
    assert rc == 0, f"the run failed ({rc}):\n{output[-8000:]}"
    assert at_loss["step"] < TOTAL_STEPS  # the node went mid-run
    resumed = [int(s) for s in re.findall(r"continuing from the checkpoint of step (\d+) of", output)]
    assert len(resumed) == 1 and at_loss["step"] <= resumed[0] < TOTAL_STEPS, (resumed, output[-8000:])
    steps, trainer = _steps(storage, "drill")
    # the last checkpoints were written by the restarted group: the replacement in, the lost node out
    assert getattr(replacement, "ip") in trainer["nodes"] and lost_ip not in trainer["nodes"], trainer["nodes"]
    assert [s["step"] for s in steps] == list(range(1, TOTAL_STEPS + 1))  # every step once
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert max_relative_loss_difference(clean, steps) <= LOSS_TOLERANCE
