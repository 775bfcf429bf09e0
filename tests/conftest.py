"""Shared fixtures: real corpora samples, one Ray instance per test session, a real S3 server,
real MLflow tracking servers.

Real components run on loopback: Ray is started once per session (every conversion test reuses
it; sub-process CLI runs join it with `--address`), S3 is moto's standalone server, reached over
HTTP by the test process, the Ray workers and any sub-process alike, and MLflow is `mlflow server`
with a SQLite or a PostgreSQL store (`mlflowserver.py`), started once per session when asked for.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "corpora"
# The real samples live in ../shared/corpora; the repository ships copies in
# examples/corpora for users (and for a checkout without shared/).
CORPORA = _SHARED if (_SHARED / "coco_panoptic").is_dir() else REPO / "examples" / "corpora"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A single-machine Ray binds to 127.0.0.1 instead of the host's address (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The tiny tokenizer that tiny model configs build on demand goes to a per-session folder, not ~/.cache.
os.environ.setdefault("XSAM_CACHE", tempfile.mkdtemp(prefix="xsam-cache-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpora() -> Path:
    return CORPORA


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; sets the standard AWS_* variables for this process and Ray."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.killpg(proc.pid, 9)
    proc.wait()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray head for the whole session (started after S3 so workers see its endpoint)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


@pytest.fixture()
def bucket(s3_server, request) -> str:
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 300):
    """Run the real `xsam` console script in a sub-process."""
    exe = Path(sys.executable).parent / "xsam"
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xsam {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `xsam ARGS` in this process (typer's CliRunner): the same parsing, commands, output and exit codes
    as the console script without a new interpreter (~8 s of imports each). `run_cli` tests the script itself."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner(env=env).invoke(app, list(args), catch_exceptions=False)
    proc = subprocess.CompletedProcess(["xsam", *args], result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"xsam {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def panoptic(ray_session, corpora, tmp_path_factory) -> Path:
    """The real COCO panoptic sample converted with the default parameters, shared by the session."""
    from builders import convert_once, panoptic_inputs

    from dataprep.convert import ConvertParams

    inputs = panoptic_inputs(corpora / "coco_panoptic")
    return convert_once(tmp_path_factory, "coco-panoptic", "coco-panoptic", inputs, ConvertParams())


@pytest.fixture(scope="session")
def task_world(corpora, tmp_path_factory) -> dict[str, Path]:
    """One converted example dataset per task (+ COCO instances for genseg) and the tiny tokenizer,
    for model tests (no Ray: converted in this process)."""
    from builders import build_task_world

    return build_task_world(corpora, tmp_path_factory.mktemp("task-world"))


@pytest.fixture(scope="session")
def eval_world(corpora, tmp_path_factory) -> dict[str, Path]:
    """The evaluation splits of the example corpora, converted once per session (no Ray)."""
    from builders import build_eval_world

    return build_eval_world(corpora, tmp_path_factory.mktemp("eval-world"))


@pytest.fixture(scope="session")
def mlflow_server():
    """A real MLflow tracking server on loopback (SQLite store, artifacts proxied to its temp dir);
    tests pass its `uri` explicitly: MLFLOW_TRACKING_URI is left alone."""
    from mlflowserver import LocalMlflowServer

    server = LocalMlflowServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mlflow_postgres():
    """The same with a PostgreSQL store, which enforces MLflow's column lengths as SQLite does not."""
    from mlflowserver import LocalMlflowServer

    server = LocalMlflowServer(backend="postgresql")
    try:
        server.start()
        yield server
    finally:
        server.close()
