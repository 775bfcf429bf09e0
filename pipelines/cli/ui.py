"""`xsam ui`: the MLflow UI on the embedded default store (./mlruns.db, ./mlartifacts) or MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from pipelines.cli.output import err_console, fail


def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback: only this machine)"),
    port: int = typer.Option(5000, "--port", help="port to listen on"),
    backend_store_uri: str = typer.Option(None, "--backend-store-uri", help="tracking store (default: "
                                          "sqlite:///./mlruns.db, where the jobs track without MLFLOW_TRACKING_URI)"),
) -> None:
    """Start the MLflow UI on the runs the jobs tracked here; open the printed address.

    Example: xsam ui --port 5000
    """
    uri = backend_store_uri
    if uri is None:
        remote = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if remote.startswith(("http://", "https://")):
            fail(f"MLFLOW_TRACKING_URI is a tracking server ({remote.split('@')[-1]}): open it in a browser; "
                 "`xsam ui` serves a local store")
        uri = remote or f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        fail(f"no tracking store at {uri[len('sqlite:///'):]}: run a job here first (`make quickstart`, or "
             "`xsam pipeline run pipelines/quickstart.yaml`), or give --backend-store-uri")
    mlflow = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow), "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1",
            "--default-artifact-root", (Path.cwd().resolve() / "mlartifacts").as_uri()]
    err_console.print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", soft_wrap=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execve(argv[0], argv, env)
