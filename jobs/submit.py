"""Where a job runs: `init_ray` connects to a cluster or starts the embedded local Ray, and Ray Job
submission (`xsam ... --address http://HOST:8265`) runs the same command on the cluster.

The command line is submitted through the Jobs API (`JobSubmissionClient`) and its logs are
followed here until it ends; the exit status is the job's. What travels in the job's metadata and
`runtime_env` is visible to everyone who can read the dashboard, so it carries no credentials: the
cluster's nodes hold their own AWS / MLflow credentials (environment, Kubernetes secrets); only the
non-secret settings below are forwarded, and a tracking URI with a password in it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

# forwarded to the job when set here; none of them is a credential
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
             "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE", "XSAM_PARENT_RUN_ID", "XSAM_MAX_ANNOTATION_BYTES")


def init_ray(address: str | None, *, num_cpus: int) -> bool:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), or start an embedded single-machine
    Ray with `num_cpus` on loopback; True when this call did either (the caller shuts it down), False
    when this process was already connected."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        # the embedded Ray binds to loopback, not the host's address (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


def forwarded_env(console: Console | None = None) -> dict[str, str]:
    from urllib.parse import urlsplit

    env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    uri = env.get("MLFLOW_TRACKING_URI")
    if uri and urlsplit(uri).password is not None:
        del env["MLFLOW_TRACKING_URI"]
        if console is not None:
            console.print("MLFLOW_TRACKING_URI holds a password: not forwarded; the job uses the cluster's own "
                          "MLFLOW_TRACKING_URI (put credentials in MLFLOW_TRACKING_USERNAME/PASSWORD there)")
    return env


def submit(address: str, argv: list[str], console: Console | None = None,
           runtime_env: dict[str, Any] | None = None) -> int:
    """Submit `xsam ARGV` as a Ray Job at a dashboard address, follow its logs, return 0 on success."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    console = console or Console(stderr=True)
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["xsam", *argv])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None)
    console.print(f"submitted Ray job [bold]{job_id}[/] to {address}: {entrypoint}", soft_wrap=True)
    status = follow_job(client, job_id)
    console.print(f"Ray job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def follow_job(client: Any, job_id: str, *, prefix: str = "", poll_s: float = 0.5) -> Any:
    """Copy a Ray Job's logs to stdout (each line after `prefix`) until it ends; its final status.
    Safe to call from several threads at once (each follows in its own event loop).

    Ray's log stream closes only seconds after the job ends (the dashboard re-reads the log file
    about every 2 s and closes after two reads past the end), so the status is polled every
    `poll_s` alongside it: once the job has ended, the rest of its log (complete by then: the
    entrypoint writes the file itself) is read in one piece and the stream is dropped."""
    copied = 0  # characters of the job's log written so far
    partial = ""

    def write(chunk: str) -> None:
        nonlocal copied, partial
        copied += len(chunk)
        if not prefix:
            sys.stdout.write(chunk)
        else:
            partial += chunk
            *lines, partial = partial.split("\n")
            sys.stdout.write("".join(f"{prefix}{line}\n" for line in lines))
        sys.stdout.flush()

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    async def follow() -> None:
        stream = asyncio.ensure_future(tail())
        while not stream.done():
            try:
                if (await asyncio.to_thread(client.get_job_status, job_id)).is_terminal():
                    break
            except Exception:  # the status cannot be read just now: the stream still ends with the job
                pass
            await asyncio.wait({stream}, timeout=poll_s)
        if stream.done():
            await stream  # raises what the stream raised
            return
        try:
            text = await asyncio.to_thread(client.get_job_logs, job_id)
        except Exception:  # the log cannot be read in one piece: follow the stream to its end
            await stream
            return
        stream.cancel()  # what it copied so far is a prefix of the complete `text`
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        write(text[copied:])

    asyncio.run(follow())
    if partial:
        sys.stdout.write(f"{prefix}{partial}\n")
        sys.stdout.flush()
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can end a moment before the status does
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return status


def submit_training(address: str, recipe: Any, argv: list[str], console: Console | None = None) -> int:
    """`xsam train` as a Ray Job: the resolved recipe travels as `recipe.yaml` in the job's working
    directory (its paths, made absolute here, must name the same places on the cluster: shared
    folders or s3://), the other options as given."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="xsam-job-") as folder:
        doc = recipe.model_dump(mode="json", by_alias=True)
        (Path(folder) / "recipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        runtime_env = {"working_dir": folder, "env_vars": forwarded_env(console)}
        return submit(address, ["train", "recipe.yaml", *argv], console, runtime_env)


def submit_with_files(address: str, argv: list[str], files: dict[str, Any], console: Console | None = None) -> int:
    """`xsam ARGV` as a Ray Job whose working directory holds copies of `files` (name -> local path),
    e.g. the benchmark file `xsam eval` reads; the environment forwarded as for training."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="xsam-job-") as folder:
        for name, path in files.items():
            shutil.copyfile(path, Path(folder) / name)
        runtime_env = {"working_dir": folder, "env_vars": forwarded_env(console)}
        return submit(address, argv, console, runtime_env)
