"""A faulty HTTP proxy on loopback, in front of the test S3 server (moto), for the S3 fault drills.

Clients reach it exactly as they reach S3: point `AWS_ENDPOINT_URL_S3` at `proxy.endpoint`. Each
request is forwarded to the real server unless a fault planned with `inject()` takes it:

- `slowdown` / `internal`: a 503 `SlowDown` / 500 `InternalError` with the XML body S3 sends (the
  request never reaches the server);
- `reset`: the request is read, then the connection is closed without an answer;
- `cut`: the server's answer is sent with its full Content-Length but only half of the body, then
  the connection is closed (a download dropped mid-body);
- `corrupt`: the server's answer with one body byte flipped (same length: only a hash can tell);
- `latency`: the answer comes `delay` seconds late; `stall`: half the body, a `delay` pause, the rest.

A fault fires on matching requests (`method`, a regex searched in the URL path) for the next `count`
of them, or for `seconds` from the first one it matches, on every `every`-th match. Every request is
recorded (`requests`), so a drill can assert that faults were really injected (`fired`) and that each
faulted request was asked again and then answered (`unanswered_faults`). Standard library only.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from conftest import free_port

KINDS = ("slowdown", "internal", "reset", "cut", "corrupt", "latency", "stall")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "expect"}


@dataclass(kw_only=True)
class Fault:
    """One planned fault (see the module docstring); `fired` counts the requests it took."""

    kind: str
    count: int | None = None
    seconds: float | None = None
    every: int = 1
    method: str | None = None
    path: str | None = None
    delay: float = 0.0
    matched: int = 0
    fired: int = 0
    first_at: float | None = None

    def active(self, now: float) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        return self.seconds is None or self.first_at is None or now - self.first_at < self.seconds

    def takes(self, method: str, path: str, now: float) -> bool:
        """Whether this request is one this fault fires on (and count it)."""
        if not self.active(now):
            return False
        if self.method is not None and method != self.method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        if self.first_at is None:
            self.first_at = now
            if not self.active(now):
                return False
        self.matched += 1
        if (self.matched - 1) % self.every:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True, kw_only=True)
class Request:
    """One request as the proxy saw it: what fault took it (None: forwarded as is) and the status sent."""

    method: str
    path: str
    query: str
    fault: str | None
    status: int | None


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyS3Proxy:
    """`with FaultyS3Proxy(upstream) as proxy:` point clients at `proxy.endpoint`, `proxy.inject(...)`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self._state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyS3Proxy:
        handler = type("Handler", (_Handler,), {"state": self._state, "upstream": self.upstream})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ planning and counting

    def inject(self, kind: str, *, count: int | None = None, seconds: float | None = None, every: int = 1,
               method: str | None = None, path: str | None = None, delay: float = 0.0) -> Fault:
        """Plan a fault; faults are tried in the order planned and the first that fires takes the request."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        if count is None and seconds is None:
            raise ValueError("give a fault a count or seconds: an endless fault would only test the timeouts")
        fault = Fault(kind=kind, count=count, seconds=seconds, every=every, method=method, path=path, delay=delay)
        with self._state.lock:
            self._state.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forget the planned faults (what was recorded stays)."""
        with self._state.lock:
            self._state.faults.clear()

    @property
    def requests(self) -> list[Request]:
        with self._state.lock:
            return list(self._state.requests)

    def fired(self) -> Counter:
        """Requests taken by a fault, per kind."""
        return Counter(r.fault for r in self.requests if r.fault is not None)

    def unanswered_faults(self) -> list[Request]:
        """Faulted requests (other than latency/stall, which answer) after which no request for the
        same method and path got the server's own answer: what the client did not ask again."""
        seen = self.requests
        out = []
        for i, req in enumerate(seen):
            if req.fault is None or req.fault in ("latency", "stall"):
                continue
            if not any(r.method == req.method and r.path == req.path and r.fault in (None, "latency", "stall")
                       for r in seen[i + 1:]):
                out.append(req)
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers `Expect: 100-continue`
    state: _State
    upstream: tuple[str, int]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _record(self, fault: Fault | None, status: int | None) -> None:
        path, _, query = self.path.partition("?")
        with self.state.lock:
            self.state.requests.append(Request(method=self.command, path=path, query=query,
                                               fault=fault.kind if fault else None, status=status))

    def _handle(self) -> None:
        body = self._body()
        path = self.path.partition("?")[0]
        now = time.monotonic()
        fault = None
        with self.state.lock:
            for candidate in self.state.faults:
                if candidate.takes(self.command, path, now):
                    fault = candidate
                    break
        kind = fault.kind if fault else None
        # recorded before answering: a client that has its answer finds its request counted
        if kind in _ERRORS:
            self._record(fault, _ERRORS[kind][0])
            self._send_error(*_ERRORS[kind])
            return
        if kind == "reset":
            self._record(fault, None)
            self._drop()
            return
        if kind == "latency":
            time.sleep(fault.delay)
        status, headers, data = self._forward(body)
        if kind == "corrupt" and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        self._record(fault, status)
        self.send_response(status)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP or name.lower() in ("server", "date"):  # send_response sends its own
                continue
            if name.lower() != "content-length" or self.command == "HEAD":
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "cut" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        if kind == "stall" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(fault.delay)
            data = data[len(data) // 2:]
        self.wfile.write(data)
        self.wfile.flush()

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _send_error(self, status: int, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<Resource>{self.path.partition('?')[0]}</Resource><RequestId>{request_id}</RequestId></Error>"
               ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
