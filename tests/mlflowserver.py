"""A real MLflow tracking server on loopback, with a SQLite or a PostgreSQL backend store.

Tests talk to it over HTTP exactly as jobs talk to a production server (`uri`), with artifacts
proxied by the server (`--artifacts-destination`), so clients need no access to the artifact store:
a local folder by default, or an `s3://` URI served from the session's S3 endpoint.

PostgreSQL is a throw-away cluster of its own (initdb into the temp dir, TCP on 127.0.0.1 only, no
unix socket, `trust` authentication, user `postgres`). initdb and postgres refuse to run as root, so
when the tests run as root (as on CI), initdb and pg_ctl run as the `postgres` system user that
Debian's postgresql package creates (`nobody` where it is missing), through subprocess's
`user=`/`group=`; that user owns only the temp dir's `pg/` folder. The binaries are taken from PATH,
else from Debian's /usr/lib/postgresql/<version>/bin, which is not on PATH.

`stop()` and `start()` keep the port and the backend store, so an outage drill (a
`stop()`, some client calls, then `start()`) ends with the same server holding the same runs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import free_port


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} was not found (install Debian's postgresql package)")
    return found


class LocalMlflowServer:
    """`start()` it, point clients at `uri`, `close()` it; `stop()` then `start()` for outages."""

    def __init__(self, backend: str = "sqlite", artifacts: str | None = None) -> None:
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unknown backend {backend!r}")
        self.backend = backend
        self.tmp = Path(tempfile.mkdtemp(prefix="xsam-mlflow-"))
        self.artifacts = artifacts or str(self.tmp / "artifacts")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        if backend == "postgresql":
            self.pg_port = free_port()
            self.pg_dir = self.tmp / "pg"  # the data dir `pg/data` and the log `pg/postgres.log`
            self.pg_dir.mkdir()
            # as root, the PostgreSQL processes run as an unprivileged user (see the module docstring)
            self.pg_user: pwd.struct_passwd | None = None
            if os.geteuid() == 0:
                users = {u.pw_name: u for u in pwd.getpwall()}
                self.pg_user = users.get("postgres") or users["nobody"]
                os.chmod(self.tmp, 0o711)
                os.chown(self.pg_dir, self.pg_user.pw_uid, self.pg_user.pw_gid)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's output, appended to across restarts."""
        return self.tmp / "mlflow.log"

    @property
    def backend_store_uri(self) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp / 'mlflow.db'}"
        # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not the pinned psycopg2
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/mlflow"

    def start(self) -> None:
        """Start (or start again) PostgreSQL if used, then the MLflow server; return once it is healthy."""
        try:
            if self.backend == "postgresql":
                self._start_postgres()
            self._start_mlflow()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the MLflow server, then PostgreSQL; the port, the store and the artifacts stay."""
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                # the whole group: `mlflow server` runs its uvicorn workers as children
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
            self.proc = None
        if self.backend == "postgresql" and (self.pg_dir / "data" / "postmaster.pid").exists():
            if self._pg("pg_ctl", "stop", "-D", "data", "-m", "fast", "-t", "30").returncode != 0:
                self._pg("pg_ctl", "stop", "-D", "data", "-m", "immediate")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _pg(self, tool: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        user = self.pg_user
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        proc = subprocess.run([_pg_bin(tool), *args], cwd=self.pg_dir, capture_output=True, text=True,
                              timeout=120, **kwargs)
        if check and proc.returncode != 0:
            log = self.pg_dir / "postgres.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}{tail}")
        return proc

    def _start_postgres(self) -> None:
        first = not (self.pg_dir / "data").exists()
        if first:
            self._pg("initdb", "-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                     "--no-sync", "--no-instructions", check=True)
        options = f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._pg("pg_ctl", "start", "-D", "data", "-o", options, "-l", "postgres.log", "-w", "-t", "60", check=True)
        if first:
            import psycopg2

            conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres")
            try:
                conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
                conn.cursor().execute("CREATE DATABASE mlflow")
            finally:
                conn.close()

    def _start_mlflow(self, timeout: float = 120) -> None:  # 13-18 s idle, up to 50 s on a busy 2-core box
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else it forks ~8 job runners
        if os.environ.get("AWS_ENDPOINT_URL_S3"):
            env["MLFLOW_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"]
        mlflow = Path(sys.executable).parent / "mlflow"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--backend-store-uri", self.backend_store_uri,
                 "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the MLflow server at {self.uri} did not become healthy "
                           f"(exit code {self.proc.poll()}):\n{tail}")

