"""A small HTTP server on 127.0.0.1 for download tests: serves in-memory files, honours `Range: bytes=N-`,
and can misbehave on request.

    with RangeServer() as srv:
        srv.add("ml-test.zip", data)            # served at srv.url + "/ml-test.zip"
        srv.ignore_range = True                 # answer 200 with the whole body even to a Range request
        srv.fail_next = 2                       # the next 2 requests get HTTP 503
        srv.drop_next = 1                       # the next request sends half its body, then hangs up
        srv.corrupt = True                      # flip one byte of every body
        ...
        srv.log                                 # [Hit(path, range, status)], one per request

Switches can be changed between requests. `range_server` is a pytest fixture yielding a fresh server.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass(frozen=True)
class Hit:
    path: str
    range: str | None  # the Range header the client sent
    status: int  # what the server answered


class RangeServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ignore_range = False
        self.fail_next = 0
        self.fail_status = 503
        self.drop_next = 0
        self.corrupt = False
        self.log: list[Hit] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setup
    def add(self, name: str, data: bytes) -> str:
        """Serve `data` at /<name> (name may contain '/'); return its URL."""
        self.files["/" + name.lstrip("/")] = data
        return f"{self.url}/{name.lstrip('/')}"

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RangeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries
    def statuses(self, path: str | None = None) -> list[int]:
        return [h.status for h in self.log if path is None or h.path == "/" + path.lstrip("/")]

    def ranges(self) -> list[str | None]:
        return [h.range for h in self.log]

    # -- serving
    def _answer(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        rng = h.headers.get("Range")
        with self._lock:
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
            drop = not fail and self.drop_next > 0
            if drop:
                self.drop_next -= 1
        data = self.files.get(path)
        if fail:
            self.log.append(Hit(path, rng, self.fail_status))
            self._answer(h, self.fail_status, b"try again later", {"Content-Type": "text/plain"})
            return
        if data is None:
            self.log.append(Hit(path, rng, 404))
            self._answer(h, 404, b"not found", {"Content-Type": "text/plain"})
            return
        if self.corrupt and data:
            data = (
                bytes([data[0] ^ 0xFF]) + data[1:] if len(data) == 1 else data[:-1] + bytes([data[-1] ^ 0xFF])
            )
        total = len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not self.ignore_range:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else total - 1
            if start >= total:
                self.log.append(Hit(path, rng, 416))
                self._answer(h, 416, b"", {"Content-Range": f"bytes */{total}"})
                return
            end = min(end, total - 1)
            status, body = 206, data[start : end + 1]
            headers = {"Content-Range": f"bytes {start}-{end}/{total}", "Accept-Ranges": "bytes"}
        else:
            status, body, headers = 200, data, {"Accept-Ranges": "none" if self.ignore_range else "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        self.log.append(Hit(path, rng, status))
        if drop:  # promise the whole body, send half of it, hang up
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._answer(h, status, body, headers)


@pytest.fixture
def range_server() -> Iterator[RangeServer]:
    with RangeServer() as srv:
        yield srv
