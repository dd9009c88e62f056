"""A stand-in for xeno-canto on 127.0.0.1: the shared dump served as API v3, with pages,
a key check and failure injection, so that tests exercise the real client over real HTTP.

    with XenoCantoServer(dump_dir, api_key="secret", per_page=50) as server:
        server.inject("XC173683", "429", "500")   # next two answers for that file fail
        download_recordings(conf, data_dir, server.api_url, api_key="secret")

Routes: `/api/3/recordings?query=..&key=..&page=N` and `/XC<id>/download` (every record's
`file` points there; `file-name` gets the extension of the file the dump actually holds).
Failure modes, consumed one per request of a route ("page:<n>" or "XC<id>"):
  "429"      429 with Retry-After: 0
  "500"      500
  "404"      404
  "truncate" full Content-Length, half the body, connection closed
  "short"    audio: the first third of the file, with that Content-Length (a file cut short
             upstream: the transfer looks complete, its mp3 header still says the whole length)
  "timeout"  nothing for `sleep_s` seconds, then the connection is closed
  "garbage"  200 with an HTML page (correct Content-Length): not audio
"""
from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

API_PATH = "/api/3/recordings"
_AUDIO_ROUTE = re.compile(r"/XC([0-9]+)/download")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for a handler still sleeping in "timeout"


class XenoCantoServer:
    def __init__(self, dump_dir: str | Path, api_key: str, per_page: int = 50,
                 sleep_s: float = 1.0, records: list[dict[str, Any]] | None = None):
        self.dump_dir = Path(dump_dir)
        self.api_key = api_key
        self.per_page = per_page
        self.sleep_s = sleep_s
        if records is None:
            records = json.loads((self.dump_dir / "recordings.json").read_text())["recordings"]
        self._records = copy.deepcopy(records)
        self._failures: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        #: (route, query parameters) of every request received, in order.
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> "XenoCantoServer":
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        for rec in self._records:
            audio = self.audio_path(str(rec.get("id")))
            if rec.get("file") and audio is not None:
                rec["file"] = f"{base}/XC{rec['id']}/download"
                rec["file-name"] = f"XC{rec['id']}{audio.suffix}"
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "XenoCantoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{API_PATH}"

    def inject(self, route: str, *modes: str) -> None:
        """Make the next len(modes) requests of `route` ("page:2", "XC123") fail so."""
        with self._lock:
            self._failures[route].extend(modes)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def count(self, route: str) -> int:
        """How many requests a route ("page:2", "XC123") received."""
        return sum(1 for r, _ in self.requests if r == route)

    def audio_path(self, rec_id: str) -> Path | None:
        if not rec_id.isdigit():
            return None
        matches = sorted((self.dump_dir / "audio").glob(f"XC{rec_id}.*"))
        return matches[0] if matches else None

    def _next_failure(self, route: str) -> str | None:
        with self._lock:
            return self._failures[route].pop(0) if self._failures[route] else None

    # ------------------------------------------------------------------ serving
    def _page(self, page: int) -> dict[str, Any]:
        n = len(self._records)
        num_pages = max(1, math.ceil(n / self.per_page))
        chunk = self._records[(page - 1) * self.per_page: page * self.per_page]
        return {"numRecordings": str(n),
                "numSpecies": str(len({(r.get("gen"), r.get("sp")) for r in self._records})),
                "page": page, "numPages": num_pages, "recordings": chunk}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # request lines hold the key: stay quiet
                pass

            def _send(self, code: int, body: bytes, content_type: str,
                      headers: dict[str, str] | None = None, cut: bool = False) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                self.wfile.flush()
                self.close_connection = True

            def _json(self, code: int, payload: dict[str, Any]) -> None:
                self._send(code, json.dumps(payload).encode(), "application/json")

            def _fail(self, mode: str) -> bool:
                """Serve an injected failure; False when `mode` is for the body."""
                if mode == "429":
                    self._send(429, b'{"error": "too many requests"}', "application/json",
                               {"Retry-After": "0"})
                    return True
                if mode in ("500", "404"):
                    self._json(int(mode), {"error": f"injected {mode}"})
                    return True
                if mode == "timeout":
                    time.sleep(server.sleep_s)
                    self.close_connection = True
                    return True
                if mode == "garbage":
                    self._send(200, b"<html><body>Service unavailable</body></html>",
                               "text/html")
                    return True
                return False

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                params = parse_qs(url.query)
                try:
                    if url.path == API_PATH:
                        self._api(params)
                    elif (m := _AUDIO_ROUTE.fullmatch(url.path)):
                        self._audio(m.group(1), params)
                    else:
                        server.requests.append((url.path, params))
                        self._json(404, {"error": "not found"})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def _api(self, params: dict[str, list[str]]) -> None:
                try:
                    page = int(params.get("page", ["1"])[0])
                except ValueError:
                    page = 0
                route = f"page:{page}"
                server.requests.append((route, params))
                if params.get("key") != [server.api_key]:
                    self._json(401, {"error": "unauthorized",
                                     "message": "Missing or invalid API key"})
                    return
                mode = server._next_failure(route)
                if mode and mode != "truncate" and self._fail(mode):
                    return
                if page < 1 or not params.get("query"):
                    self._json(400, {"error": "bad request", "message": "query and page"})
                    return
                body = json.dumps(server._page(page)).encode()
                self._send(200, body, "application/json", cut=mode == "truncate")

            def _audio(self, rec_id: str, params: dict[str, list[str]]) -> None:
                route = f"XC{rec_id}"
                server.requests.append((route, params))
                mode = server._next_failure(route)
                if mode and mode != "truncate" and self._fail(mode):
                    return
                path = server.audio_path(rec_id)
                if path is None:
                    self._json(404, {"error": "no such recording"})
                    return
                body = path.read_bytes()
                if mode == "short":
                    body = body[:len(body) // 3]
                self._send(200, body, "audio/mpeg", cut=mode == "truncate")

        return Handler
