"""A real multi-process Ray cluster on loopback for tests that need one of their own.

The session-wide Ray of conftest.py serves most tests; this one adds what it cannot: a dashboard
(the Jobs API) and a second node on another loopback address (127.0.0.2), so Ray sees two real
nodes. `remove_node` takes a node away as a machine loss does (fault drills). Everything it starts
is stopped by `stop()` without `ray stop`, which would also kill the session's shared Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import free_port


class LocalRayCluster:
    def __init__(self) -> None:
        self.bin = Path(sys.executable).parent
        self.tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # Ray's unix socket paths must stay short
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            # a real multi-node cluster (explicit loopback node addresses), unlike the session Ray
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            # the head checks each node every 1 s instead of 3 s (5 misses mark it dead): a removed node is
            # noticed after ~5 s instead of ~15 s; a slow but live node still has the default 10 s to answer
            "RAY_health_check_period_ms": "1000",
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.procs: list[subprocess.Popen] = []
        self.removed: list[subprocess.Popen] = []  # nodes taken away by remove_node
        self.port = free_port()
        self.dashboard_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(Path(self.tmp) / f"start-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [str(self.bin / "ray"), "start", *args, "--block", "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_head(self, num_cpus: int, dashboard: bool) -> None:
        args = ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--num-cpus={num_cpus}",
                f"--temp-dir={self.tmp}", f"--dashboard-agent-listen-port={free_port()}"]
        if dashboard:
            self.dashboard_port = free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        head = self._start(args)
        self.wait_nodes(1, head)
        if dashboard:
            self._wait_http(f"{self.dashboard}/api/version", head)

    def add_node(self, ip: str, num_cpus: int) -> subprocess.Popen:
        """Start a node on loopback address `ip` (127.0.0.2, 127.0.0.3, ...) and wait until it has
        joined; returns its `ray start` process (what `remove_node` takes)."""
        # its own session folder, as a node on another machine has: nodes sharing one would clean up
        # each other's runtime-env files (a submitted job's working directory among them)
        temp = f"{self.tmp}n{len(self.procs)}"
        node = self._start([f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
                            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}"])
        node.temp_dir = temp  # type: ignore[attr-defined]
        node.ip = ip  # type: ignore[attr-defined]
        self._wait_started(node)
        self.wait_nodes(len(self.procs) - len(self.removed), node)
        return node

    def remove_node(self, node: subprocess.Popen) -> None:
        """Take a node away as a machine loss does: every process of it dies at once (SIGKILL to its
        process group, then to any process that left the group but names its session folder), with
        no goodbye to the head; Ray finds out by its own health checks."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        self._kill_naming(getattr(node, "temp_dir").encode(), exact=True)
        node.wait()
        self.removed.append(node)

    def _wait_started(self, node: subprocess.Popen, timeout: float = 120) -> None:
        # `ray start` prints this once the GCS lists the node's raylet (ray._private.node.Node)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in Path(getattr(node, "log_path")).read_text(errors="replace"):
            if node.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.returncode}:\n{self._tail(node)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not join in {timeout} s:\n{self._tail(node)}")
            time.sleep(0.2)

    def wait_nodes(self, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{self._tail(proc)}")
            status = subprocess.run([str(self.bin / "ray"), "status", f"--address={self.address}"],
                                    env=self.env, capture_output=True, text=True)
            # the "Active:" nodes only; a removed node stays among them until Ray notices its loss
            # (~5 s of missed health checks), so add_node first waits for the node's own "started"
            active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if status.returncode == 0 and active.count("node_") >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes")

    @staticmethod
    def _kill_naming(marker: bytes, *, exact: bool) -> None:
        """SIGKILL every process whose command line names `marker` (a temp folder); `exact`: that
        folder itself, not others it is a prefix of (node n1 is not node n12)."""
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            found = (marker + b"/" in cmdline or marker + b"\0" in cmdline) if exact else marker in cmdline
            if found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc_dir.name), signal.SIGKILL)

    @staticmethod
    def _tail(proc: subprocess.Popen) -> str:
        path = getattr(proc, "log_path", None)
        return Path(path).read_text(errors="replace")[-3000:] if path else ""

    @staticmethod
    def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{url} did not answer")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # a test cluster needs no graceful shutdown: what is left is killed
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # processes that left their process group still name this cluster's temp dir
        self._kill_naming(self.tmp.encode(), exact=False)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for folder in Path(self.tmp).parent.glob(Path(self.tmp).name + "*"):
            shutil.rmtree(folder, ignore_errors=True)
