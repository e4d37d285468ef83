"""A small fake Hugging Face Hub served on loopback, for testing downloads with the real client.

`FakeHub` serves repos from a dict {repo_id: {filename: bytes}} over HTTP on 127.0.0.1 and speaks the
part of the Hub API that `huggingface_hub.snapshot_download` (2.x) uses:

- `GET /api/models/{repo}[/revision/{rev}]`: model info (`id`, `sha`, `siblings`, `gated`, ...);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...`: the file listing (size, git oid, LFS info);
- `HEAD` / `GET /{repo}/resolve/{rev}/{filename}`: the file, with `X-Repo-Commit`, `ETag` (sha256 for LFS
  files, git blob sha1 otherwise), `Content-Length`, `Accept-Ranges`, and `Range` requests (206 +
  `Content-Range`) for resumed transfers;
- errors as the Hub sends them: 404 + `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`,
  401 (no token) / 403 (wrong token) + `X-Error-Code: GatedRepo` for gated repos' files.

Files are served directly (no CDN redirect) and no `X-Xet-*` header or `xetHash` is ever sent, so the
client always takes its plain-HTTP path, never hf_xet. Revisions are `main` and the repo's commit sha.

Faults: `cut(filename, after, then_drop)` makes the next GET of a file send `after` bytes of the body and
close the connection, then drops the next `then_drop` GETs of it before any response. `requests` logs
every request (method, path, Range, Authorization, status). `activate(monkeypatch, home)` points the
installed huggingface_hub at the server with a fresh HF_HOME (env vars and the constants it read at import).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".model")


@dataclasses.dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0


@dataclasses.dataclass
class _Fault:
    after: int       # body bytes sent before the connection is closed
    then_drop: int   # following GETs closed before any response


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Stop serving and hang up on every open (keep-alive) connection: the Hub is gone."""
        self.shutdown()
        self.server_close()
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hang up; that's fine
            super().handle_error(request, client_address)


class FakeHub:
    """Context manager: a threaded HTTP server on 127.0.0.1 (free port) serving `repos`."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: dict[str, str] | None = None):
        self.repos = repos
        self.gated = dict(gated or {})  # repo_id -> the token that may read it
        self.requests: list[Request] = []
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def __enter__(self) -> "FakeHub":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close_all()

    @property
    def url(self) -> str:
        assert self._server is not None, "use FakeHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def activate(self, monkeypatch, home: Path, chunk_size: int = 1024) -> None:
        """Point huggingface_hub at this server, with HF_HOME=`home`, no token and online mode.

        huggingface_hub reads its settings into `huggingface_hub.constants` at import time, so those are
        patched along with the environment (which is what a fresh process would read). `chunk_size`
        replaces its 10 MB download chunk: the client writes only whole chunks, so with tiny files a
        transfer cut mid-body would otherwise leave nothing on disk to resume from.
        """
        import huggingface_hub
        from huggingface_hub import constants

        home = Path(home)
        env = {
            "HF_ENDPOINT": self.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "HF_HUB_DISABLE_PROGRESS_BARS"):
            monkeypatch.delenv(key, raising=False)
        patched = {
            "ENDPOINT": self.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_ETAG_TIMEOUT": 5, "HF_HUB_DOWNLOAD_TIMEOUT": 5, "DOWNLOAD_CHUNK_SIZE": chunk_size,
        }
        for key, value in patched.items():
            if hasattr(constants, key):
                monkeypatch.setattr(constants, key, value)
        huggingface_hub.close_session()  # no pooled connection to an earlier test's server

    # -- faults and inspection ------------------------------------------------------------------

    def cut(self, filename: str, after: int, then_drop: int = 0) -> None:
        """The next GET of `filename` sends `after` body bytes then closes the connection; the
        `then_drop` GETs after it are closed before any response."""
        with self._lock:
            self._faults[filename] = _Fault(after, then_drop)

    def commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        return digest.hexdigest()

    def file_requests(self, filename: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith("/" + filename)]

    def downloaded(self) -> set[str]:
        """Names of the files whose body was requested with GET /resolve."""
        return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path}

    # -- what the handler asks ------------------------------------------------------------------

    def _take_fault(self, filename: str) -> str | None:
        """'cut' / 'drop' / None for this GET of `filename`."""
        with self._lock:
            fault = self._faults.get(filename)
            if fault is None:
                return None
            if fault.after >= 0:
                after, fault.after = fault.after, -1
                if fault.then_drop <= 0:
                    del self._faults[filename]
                return f"cut:{after}"
            fault.then_drop -= 1
            if fault.then_drop <= 0:
                del self._faults[filename]
            return "drop"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- routing --------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._record = Request(method, urlsplit(self.path).path, self.headers.get("Range"),
                               self.headers.get("Authorization"))
        with self.hub._lock:
            self.hub.requests.append(self._record)
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        if path.startswith("/api/models/") and method == "GET":
            rest = path[len("/api/models/"):]
            for keyword in ("/revision/", "/tree/"):
                if keyword in rest:
                    repo_id, tail = rest.split(keyword, 1)
                    rev, _, sub = tail.partition("/")
                    if keyword == "/tree/":
                        return self._tree(repo_id, rev, sub, query)
                    return self._info(repo_id, rev)
            return self._info(rest, "main")
        if "/resolve/" in path and method in ("GET", "HEAD"):
            repo_id, tail = path.lstrip("/").split("/resolve/", 1)
            rev, _, filename = tail.partition("/")
            return self._resolve(method, repo_id, rev, filename)
        self._error(404, None, f"no route for {method} {path}")

    def _repo(self, repo_id: str, rev: str) -> tuple[dict[str, bytes], str] | None:
        if repo_id not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = self.hub.commit(repo_id)
        if rev not in ("main", commit):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, commit=None)
            return None
        return self.hub.repos[repo_id], commit

    # -- endpoints ------------------------------------------------------------------------------

    def _info(self, repo_id: str, rev: str) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        files, commit = found
        self._json({
            "_id": commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit, "private": False, "disabled": False,
            "gated": "manual" if repo_id in self.hub.gated else False,
            "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        })

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        files, _ = found
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if "/" in rel:
                parts = rel.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    continue
            data = files[name]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, method: str, repo_id: str, rev: str, filename: str) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        files, commit = found
        if repo_id in self.hub.gated:
            auth = self.headers.get("Authorization") or ""
            if not auth:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have"
                                   " access to it and be authenticated to access it. Please log in.", commit)
            if auth != f"Bearer {self.hub.gated[repo_id]}":
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not"
                                   " in the authorized list.", commit)
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"", commit)
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest() if filename.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if method == "HEAD":
            return self._send(200, headers, b"", content_length=len(data))

        fault = self.hub._take_fault(filename)
        if fault == "drop":
            return self._hang_up()
        start, end, status = 0, len(data) - 1, 200
        requested = self.headers.get("Range")
        if requested:
            try:
                unit, _, spec = requested.partition("=")
                first, _, last = spec.split(",")[0].strip().partition("-")
                start = int(first)
                end = min(int(last), len(data) - 1) if last else len(data) - 1
                assert unit.strip() == "bytes"
            except (ValueError, AssertionError):
                return self._error(400, None, f"bad Range header {requested!r}", commit)
            if start >= len(data) or start > end:
                return self._send(416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        if fault is not None:  # "cut:N": promise the whole body, send N bytes, hang up
            sent = int(fault.split(":")[1])
            self._record.status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[:sent])
            self.wfile.flush()
            return self._hang_up()
        self._send(status, headers, body)

    # -- responses ------------------------------------------------------------------------------

    def _send(self, status: int, headers: dict, body: bytes, content_length: int | None = None) -> None:
        self._record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _hang_up(self) -> None:
        self._record.status = -1
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
