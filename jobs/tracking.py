"""MLflow tracking for the jobs: buffered, retried, never blocking the work it records.

`Tracker` queues every call (metrics with their timestamps fixed when they are recorded, params,
tags, dataset inputs, artifacts) and a background thread sends them in order through an
`MlflowClient`. While the tracking server is unreachable the queue keeps growing, the thread retries
with backoff, and the job is told once (a warning naming the server, without credentials); when the
server answers again everything queued is sent, in order, once. `close(timeout)` waits for the queue
to drain and says how much could not be sent; while it waits, the thread retries every second rather
than after its backoff (up to `retry_max_s`), so a server back within the timeout gets everything.
A call whose answer was lost (the server went down mid-request) is sent again: metrics keep the
timestamp they were recorded with, so MLflow's store recognises the repeat and keeps each one once.

What is sent never carries secrets: URIs are shown without their user info (`redact_uri`), and a
param or tag holding the value of a credential variable of the environment (AWS_*,
MLFLOW_TRACKING_PASSWORD/TOKEN ...) is sent with that value replaced by `***` (`scrub`).

Where the tracking server is (the standard variables):
- `MLFLOW_TRACKING_URI`; unset: the embedded default, a SQLite file `./mlruns.db` with artifacts
  under `./mlartifacts`;
- `MLFLOW_EXPERIMENT_NAME`; unset: the recipe's `mlflow.experiment`.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("xsam.tracking")

# Environment variables whose values must never reach MLflow, logs or job metadata.
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "RAY_AUTH_TOKEN", "PGPASSWORD",
)
# MLflow's SQL stores hold dataset digests in 36 characters.
DIGEST_CHARS = 32
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics


def redact_uri(uri: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://***@host/...` (anything else unchanged)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def secret_values() -> list[str]:
    return [v for k in SECRET_VARIABLES if len(v := os.environ.get(k, "")) >= 4]


def scrub(mapping: dict[str, Any], what: str) -> dict[str, str]:
    """`mapping` as strings, with the value of any credential variable of this environment replaced
    by `***` (and a warning naming the key, never the value)."""
    secrets = secret_values()
    out = {}
    for key, value in mapping.items():
        text = str(value)
        if any(s in text or s in key for s in secrets):
            log.warning("MLflow %s %r held the value of a credential variable: sent as ***", what, key)
            text = redact_text(text)
            key = redact_text(key)
        out[key] = text
    return out


@dataclass(frozen=True, kw_only=True)
class TrackingTarget:
    """Where runs go: the tracking URI and the experiment (with its artifact location when new)."""

    uri: str
    experiment: str
    artifact_location: str | None = None

    @classmethod
    def from_environment(cls, default_experiment: str, *, cwd: Path | None = None) -> TrackingTarget:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        artifacts = None
        if not uri:
            base = (cwd or Path.cwd()).resolve()
            uri = f"sqlite:///{base / 'mlruns.db'}"
            artifacts = (base / "mlartifacts").as_uri()
        return cls(uri=uri, experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or default_experiment,
                   artifact_location=artifacts)

    def shown(self) -> str:
        return redact_uri(self.uri)


def _quiet_http() -> None:
    # our own queue retries; MLflow's defaults (7 retries, 120 s timeout) would hold a request for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def client_for(target: TrackingTarget):
    _quiet_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target.uri)


def ensure_experiment(client, target: TrackingTarget) -> str:
    found = client.get_experiment_by_name(target.experiment)
    if found is not None:
        return found.experiment_id
    try:
        # a training experiment: the MLflow UI opens it on its runs table (not the GenAI overview)
        return client.create_experiment(target.experiment, artifact_location=target.artifact_location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # created meanwhile by another job
        found = client.get_experiment_by_name(target.experiment)
        if found is None:
            raise
        return found.experiment_id


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping -> `a.b.c` keys with string values (lists kept as their JSON text)."""
    import json

    out: dict[str, str] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not doc and prefix:
            out[prefix[:-1]] = "{}"
        return out
    text = doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True)
    return {prefix[:-1]: text[:6000]}  # MLflow's param value limit


class Tracker:
    """Buffered, retried logging into one MLflow run (see the module docstring)."""

    def __init__(self, target: TrackingTarget, run_id: str, *, retry_min_s: float = 1.0,
                 retry_max_s: float = 30.0) -> None:
        """`retry_min_s`: the wait after the first failed call, doubled after each further one up to
        `retry_max_s` (until close(), which retries every second)."""
        self.target = target
        self.run_id = run_id
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._warned = False
        self._closing = threading.Event()  # set by close(): retry at once and every second
        self._spool = Path(tempfile.mkdtemp(prefix="xsam-tracking-"))
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="xsam-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what callers queue

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._put("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = scrub(params, "param")
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's log_batch limit on params
            self._put("params", items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        flat = scrub(tags, "tag")
        self._put("tags", [RunTag(k, v) for k, v in flat.items()])

    def log_inputs(self, datasets: list[Any]) -> None:
        """`mlflow.entities.DatasetInput`s (see `dataset_input`)."""
        self._put("inputs", datasets)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy `path` (a file, or a folder: its whole tree) now (the caller may change it later) and
        send the copy."""
        copy = self._spooled(Path(path).name)
        if Path(path).is_dir():
            shutil.copytree(path, copy)
            self._put("artifacts", (copy, artifact_path))
        else:
            shutil.copyfile(path, copy)
            self._put("artifact", (copy, artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        copy = self._spooled(Path(artifact_file).name)
        copy.write_text(text)
        parent = str(Path(artifact_file).parent)
        self._put("artifact", (copy, None if parent == "." else parent))

    def _spooled(self, name: str) -> Path:
        """A new file path in a folder of its own (sent artifacts are removed folder by folder)."""
        folder = self._spool / f"{time.monotonic_ns()}"
        folder.mkdir()
        return folder / name

    def terminate(self, status: str) -> None:
        self._put("terminate", status)

    # ------------------------------------------------------------------ the sending thread

    def _put(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put((kind, payload))

    @property
    def pending(self) -> int:
        return self._pending

    def _send(self, client, kind: str, payload: Any) -> None:
        if kind == "metrics":
            for i in range(0, len(payload), MAX_BATCH):
                client.log_batch(self.run_id, metrics=payload[i:i + MAX_BATCH], synchronous=True)
        elif kind == "params":
            client.log_batch(self.run_id, params=payload, synchronous=True)
        elif kind == "tags":
            client.log_batch(self.run_id, tags=payload, synchronous=True)
        elif kind == "inputs":
            client.log_inputs(self.run_id, datasets=payload)
        elif kind == "artifact":
            path, artifact_path = payload
            client.log_artifact(self.run_id, str(path), artifact_path)
            shutil.rmtree(path.parent, ignore_errors=True)
        elif kind == "artifacts":
            path, artifact_path = payload
            client.log_artifacts(self.run_id, str(path), artifact_path)
            shutil.rmtree(path.parent, ignore_errors=True)
        elif kind == "terminate":
            client.set_terminated(self.run_id, status=payload)

    def _run(self) -> None:
        client = client_for(self.target)
        delay = self.retry_min_s
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            failed = False
            while True:
                try:
                    self._send(client, kind, payload)
                    break
                except Exception as exc:  # unreachable, 5xx, ...: keep it and retry
                    if _permanent(exc):
                        log.warning("MLflow refused %s for run %s: %s (dropped)", kind, self.run_id, _short(exc))
                        break
                    if not self._warned:
                        self._warned = True
                        log.warning("MLflow tracking at %s is not answering (%s); the job goes on, its records "
                                    "are kept and sent when it answers", self.target.shown(), _short(exc))
                    failed = True
                    if self._closing.is_set():
                        time.sleep(1.0)
                    else:
                        self._closing.wait(delay)  # close() cuts a long backoff short
                    delay = min(delay * 2, self.retry_max_s)
            if failed:
                log.warning("MLflow tracking at %s answers again; sending what was kept", self.target.shown())
                delay = self.retry_min_s
            with self._lock:
                self._pending -= 1
                self.sent += 1

    def close(self, timeout: float = 60.0) -> int:
        """Wait up to `timeout` s for everything queued to be sent; returns how many calls were not."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._pending
        if left:
            log.warning("MLflow tracking at %s: %d logging calls could not be sent within %.0f s",
                        self.target.shown(), left, timeout)
        else:
            self._queue.put(None)
            self._thread.join(timeout=5)
            shutil.rmtree(self._spool, ignore_errors=True)
        return left


def _permanent(exc: Exception) -> bool:
    """An answer that retrying cannot change (a 4xx other than throttling)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    code = getattr(exc, "get_http_status_code", lambda: 500)()
    return 400 <= code < 500 and code not in (408, 429)


def _short(exc: Exception) -> str:
    text = redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return text[:300]


def redact_text(text: str) -> str:
    for secret in secret_values():
        text = text.replace(secret, "***")
    return text


def dataset_input(*, name: str, path: str, version: str, context: str, profile: dict[str, Any]) -> Any:
    """An MLflow dataset input for a converted dataset folder: digest = its manifest sha256
    (the first 32 hex digits: MLflow's SQL stores keep 36 characters), the whole sha256 in the
    source and the `xsam.version` input tag."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=version[:DIGEST_CHARS], source_type="xsam-shards",
                      source=json.dumps({"uri": path, "version": version}), profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context),
                                                InputTag("xsam.version", version)])


def system_metrics(process: Any | None = None) -> dict[str, float]:
    """This machine and process, for the run: CPU and memory, and the GPU's memory where there is one."""
    import psutil

    proc = process or psutil.Process()
    memory = psutil.virtual_memory()
    out = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system/system_memory_usage_percentage": memory.percent,
        "system/process_rss_megabytes": proc.memory_info().rss / 2**20,
    }
    try:
        import torch

        if torch.cuda.is_available():
            out["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated() / 2**20
            out["system/gpu_memory_reserved_megabytes"] = torch.cuda.max_memory_reserved() / 2**20
    except Exception:  # no torch / no driver: CPU numbers only
        pass
    return out


def start_run(target: TrackingTarget, *, run_name: str, tags: dict[str, str], run_id: str | None = None,
              attempts: int = 3, on_error: Callable[[str], None] | None = None) -> str | None:
    """Create the run (or reopen `run_id`); None, after a warning, when the server cannot be reached
    (the job goes on untracked rather than waiting for it)."""
    client = client_for(target)
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            if run_id:
                client.update_run(run_id, status="RUNNING")
                return run_id
            experiment = ensure_experiment(client, target)
            return client.create_run(experiment, run_name=run_name, tags=scrub(tags, "tag")).info.run_id
        except Exception as exc:
            if _permanent(exc):
                raise
            last = exc
            time.sleep(min(2.0 ** attempt, 5.0))
    message = (f"MLflow tracking at {target.shown()} is not answering ({_short(last)}): this run is not tracked")
    (on_error or log.warning)(message)
    return None
