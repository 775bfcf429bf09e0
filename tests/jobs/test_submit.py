"""`--address http://...` submits the conversion as a Ray Job to a running cluster and follows it.

A real Ray head with its dashboard (the Jobs API) is started on loopback for this test only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builders import build_panoptic, dataset_files
from conftest import free_port, run_cli

pytestmark = pytest.mark.slow


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the Ray dashboard did not come up")


def _kill_tree(head: subprocess.Popen, marker: str) -> None:
    import signal

    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # processes of this head that left its process group still name its temp dir
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                try:
                    os.kill(int(proc_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture()
def ray_head():
    import shutil
    import tempfile

    short_tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # Ray's unix socket paths must stay short
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port, dash, agent = free_port(), free_port(), free_port()
    start = [
        str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
        f"--temp-dir={short_tmp}",
    ]
    head = subprocess.Popen(
        [*start, "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for_dashboard(dash, head)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # only this head: `ray stop` would also kill the session's shared Ray
        _kill_tree(head, short_tmp)
    shutil.rmtree(short_tmp, ignore_errors=True)


def test_convert_submitted_as_ray_job(ray_head, corpora, tmp_path):
    address, env = ray_head
    paths = build_panoptic(corpora, tmp_path / "coco", 4)
    args = ["data", "convert", "coco-panoptic", "--out", str(tmp_path / "out"), "--shard-max-samples", "2"]
    for name, path in paths.items():
        args += [f"--{name}", str(path)]
    proc = run_cli(*args, "--address", address, env=env)
    assert "submitted Ray job" in proc.stderr and "SUCCEEDED" in proc.stderr
    assert "records_read 4 == samples 4 + quarantined 0" in proc.stdout  # the job's logs, followed
    info = json.loads(run_cli("data", "info", str(tmp_path / "out"), "--json").stdout)
    assert info["samples"] == 4 and info["shards"] == 2
    # the same command run locally gives the same bytes
    run_cli(*[a if a != str(tmp_path / "out") else str(tmp_path / "local") for a in args])
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "local")
