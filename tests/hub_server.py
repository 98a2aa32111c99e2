"""A small in-memory emulation of the Hugging Face Hub HTTP API, for offline tests.

The real ``huggingface_hub`` client (2.x) is pointed at this server through ``HF_ENDPOINT``; it
then uploads, downloads and inspects repos on 127.0.0.1 exactly as it would on huggingface.co.
Standard library only (PyYAML is used for README front matter when importable).

Usage (this is what ``tests/conftest.py`` does, before anything imports ``huggingface_hub``)::

    HUB = HubServer(token="hf_...")      # token=None => no authentication required at all
    HUB.start()                          # 127.0.0.1, free port, daemon thread
    os.environ["HF_ENDPOINT"] = HUB.url
    os.environ["HF_TOKEN"] = HUB.token
    os.environ["HF_HUB_DISABLE_XET"] = "1"   # we speak plain git-LFS, not Xet

What is honoured
----------------
* ``POST /api/repos/create`` (409 + ``url`` when the repo exists; ``visibility`` or ``private``),
  ``DELETE /api/repos/delete``, ``PUT /api/T/{repo}/settings`` (visibility only).
* ``GET /api/T/{repo}[/revision/{rev}]`` (model/dataset/space info; ``blobs=true`` adds sizes, blob
  ids and LFS metadata to ``siblings``; ``cardData``/``tags`` come from README.md front matter).
* Uploads: ``preupload`` (regular vs LFS decision + existing ``oid`` so the client can skip unchanged
  files), the git-LFS batch API (basic transfer only), the upload ``PUT`` (sha256 and size checked)
  and ``verify``, and the ndjson ``commit`` endpoint (``file``, ``lfsFile``, ``deletedFile``,
  ``deletedFolder``; ``parentCommit`` -> 412 when stale; ``create_pr=1`` creates ``refs/pr/N``).
* Commits are created exactly as sent, even when they change nothing -- the real Hub does the same
  (huggingface_hub issue #1411).  "Unchanged upload => no new commit" is the *client's* job: it
  compares the ``oid`` returned by ``preupload`` with its local git-sha1/sha256, drops unchanged files
  and, when nothing is left, does not call ``commit`` at all (``HfApi.create_commit``).
* Reads: ``tree`` (recursive or not, ``expand`` adds ``lastCommit``), ``paths-info``, ``refs``,
  ``commits``, ``branch`` (create/delete), ``tag`` (create/delete), ``whoami-v2``, ``validate-yaml``.
* ``HEAD``/``GET /{prefix}{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, quoted ``ETag``
  (git blob sha1 for regular files, sha256 for LFS files), ``X-Linked-Etag``/``X-Linked-Size`` for
  LFS files and single ``Range: bytes=...`` requests (206 + ``Content-Range``).
* Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) and
  ``X-Error-Message`` the way the client's ``hf_raise_for_status`` expects them.
* Auth: with a token configured, writes and ``whoami`` need ``Authorization: Bearer <token>``
  (401 ``Invalid credentials in Authorization header`` otherwise), reads of private repos need it
  too, and -- like the Hub -- a *wrong* token is rejected even on public reads.

Fault injection (for the hostile-input tests): ``inject(repo, path, status=/headers=/short=)`` makes the
resolve endpoint answer a wrong status, drop or forge headers (``X-Repo-Commit``, ``ETag``) or send a
short body; ``inject_upload_failure(status)`` fails LFS uploads; ``clear_faults()`` undoes both.

What is NOT honoured: Xet storage (never sends ``xetHash``/Xet headers), multipart LFS uploads,
redirects to a CDN, pagination (every list is returned in one page), discussions beyond the PR ref,
gating, ``expand[]`` field selection in repo info (all fields are always returned), gitignore
handling in preupload (``shouldIgnore`` is always false), repos without a ``namespace/`` part.

Nothing logs the Authorization header: ``log_message`` is silenced, ``request_log`` only keeps
``(method, path)`` without the query string and ``header_log`` adds only ``User-Agent`` and ``Range``.

Offline mode with huggingface_hub 2.4.0
---------------------------------------
``HF_HUB_OFFLINE`` is read once, into ``huggingface_hub.constants.HF_HUB_OFFLINE``, when the
package is imported; setting the environment variable later does nothing.  At call time the
client's request hook checks ``constants.is_offline_mode()``, which returns that module attribute,
so patching the attribute is enough for huggingface_hub itself (and for transformers, which calls
``huggingface_hub.is_offline_mode()``)::

    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

Then ``hf_hub_download`` returns already-cached files and raises
``huggingface_hub.errors.LocalEntryNotFoundError`` for uncached ones; other calls through the
client's HTTP session (``HfApi().model_info`` ...) raise ``huggingface_hub.errors.OfflineModeIsEnabled``
before anything reaches the network.

Caveat: diffusers 0.42 copies the flag by value at import (``from huggingface_hub.constants import
HF_HUB_OFFLINE`` in ``diffusers.loaders.lora_base``, ``diffusers.utils.hub_utils``, ...), so those
copies must be patched too, and those modules must already be imported when you patch (a module
first imported while offline keeps ``True`` forever).  ``set_hub_offline(monkeypatch)`` below does
all of this.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

try:  # huggingface_hub depends on PyYAML, so this normally succeeds
    import yaml
except ImportError:  # pragma: no cover - fallback keeps the module stdlib-only
    yaml = None

PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # in resolve and .git URLs
URL_PREFIX_TO_TYPE = {prefix: repo_type for repo_type, prefix in URL_PREFIX.items()}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_THRESHOLD = 10 * 1024 * 1024  # files above this size always go to LFS, like on the Hub
DEFAULT_GITATTRIBUTES = (
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
)
_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_HEX = re.compile(r"[0-9a-f]{7,40}")


def _git_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what git and the Hub call a blob's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Blob:
    """File content plus the ids the Hub derives from it."""

    def __init__(self, data: bytes, lfs: bool):
        self.data = data
        self.lfs = lfs
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.git_oid = _git_sha1(data)
        if lfs:
            # In git an LFS file is a small pointer file; its blob id is the pointer's sha1.
            self.pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            ).encode()
            self.blob_id = _git_sha1(self.pointer)
        else:
            self.pointer = None
            self.blob_id = self.git_oid

    @property
    def etag(self) -> str:
        """sha256 for LFS files, git sha1 otherwise: the resolve ``ETag`` and the ``preupload`` oid.

        The client names cached blobs after the ETag, and compares the preupload oid with the
        sha256 (LFS mode) or git sha1 (regular mode) of the local file to skip unchanged files.
        """
        return self.sha256 if self.lfs else self.git_oid

    def lfs_json(self, sha_key: str) -> dict:
        return {sha_key: self.sha256, "size": self.size, "pointerSize": len(self.pointer)}


class Fault:
    """How the server misbehaves for one file (see ``HubServer.inject``)."""

    def __init__(self, methods: tuple[str, ...], status: int | None, error_code: str | None, headers: dict,
                 short: int | None):
        self.methods, self.status, self.error_code = methods, status, error_code
        self.headers, self.short = headers, short


class Commit:
    """A commit: full snapshot of the tree (path -> Blob) plus its single parent."""

    def __init__(self, sha: str, parent: str | None, tree: dict, title: str, message: str):
        self.sha = sha
        self.parent = parent
        self.tree = tree  # path -> Blob (a full snapshot; blobs are shared between commits)
        self.title = title
        self.message = message
        self.date = datetime.now(timezone.utc)


class Repo:
    """A repo's commits and refs. Branch names are stored as the client spells them ("refs/pr/1")."""

    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type = repo_type
        self.repo_id = repo_id
        self.private = private
        self.created_at = datetime.now(timezone.utc)
        self.commits: dict[str, Commit] = {}
        self.branches: dict[str, str] = {}  # name (e.g. "main", "refs/pr/1") -> commit sha
        self.tags: dict[str, str] = {}
        self.pr_count = 0

    def resolve(self, revision: str) -> Commit | None:
        """Branch, tag, ``refs/heads/x``, full sha or unique sha prefix (>= 7 chars) -> commit."""
        for name in (revision, revision.removeprefix("refs/heads/")):
            if name in self.branches:
                return self.commits[self.branches[name]]
        name = revision.removeprefix("refs/tags/")
        if name in self.tags:
            return self.commits[self.tags[name]]
        if _HEX.fullmatch(revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None

    def history(self, commit: Commit):
        while commit is not None:
            yield commit
            commit = self.commits.get(commit.parent) if commit.parent else None


class HubError(Exception):
    """Raised inside handlers; turned into an HTTP error response with Hub-style headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """In-memory fake Hub. See the module docstring for the honoured API surface."""

    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.host = host
        self.port = port
        self.request_log: list[tuple[str, str]] = []
        #: (method, path, {"user-agent": ..., "range": ...}) per request: what tests check about clients
        self.header_log: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lfs: dict[str, bytes] = {}  # sha256 -> content, shared by all repos
        self._corrupted: set[tuple[str, str, str, str]] = set()  # (type, repo, path, sha256)
        self._faults: dict[tuple[str, str, str], Fault] = {}  # (type, repo, path) -> how to misbehave
        self._upload_failure: int | None = None  # HTTP status the LFS upload PUT answers with
        self._counter = 0
        self._secret = secrets.token_bytes(16)  # signs LFS upload URLs (the client PUTs without auth)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- test helpers
    def corrupt(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> None:
        """Serve that file's bytes with a few bits flipped from now on (same size, same headers)."""
        with self._lock:
            repo, commit = self._lookup(repo_type, repo_id, revision)
            if path not in commit.tree:
                raise KeyError(f"{path} not in {repo_id}@{revision}")
            # Keyed by content so every revision serving this exact file is affected.
            self._corrupted.add((repo_type, repo_id, path, commit.tree[path].sha256))

    def uncorrupt_all(self) -> None:
        with self._lock:
            self._corrupted.clear()

    def inject(self, repo_id: str, path: str, *, methods: tuple[str, ...] = ("HEAD", "GET"), status: int | None = None,
               error_code: str | None = None, headers: dict | None = None, short: int | None = None,
               repo_type: str = "model") -> None:
        """Misbehave on purpose when ``path`` of ``repo_id`` is resolved (any revision), until ``clear_faults``.

        ``status``: answer the ``methods`` with this HTTP status (``error_code`` as ``X-Error-Code``, none by
        default). ``headers``: override response headers (``None`` as a value drops the header; an
        ``ETag`` also replaces ``X-Linked-Etag``, which the client prefers). ``short``: GET serves only
        that many bytes (with a matching Content-Length) while HEAD announces the full size.
        """
        with self._lock:
            self._faults[(repo_type, repo_id, path)] = Fault(tuple(methods), status, error_code, dict(headers or {}),
                                                             short)

    def inject_upload_failure(self, status: int = 500) -> None:
        """Answer every LFS upload PUT with ``status`` until ``clear_faults``."""
        with self._lock:
            self._upload_failure = status

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._upload_failure = None

    def copy_repo(self, source: str, target: str, repo_type: str = "model") -> None:
        """Create ``target`` with ``source``'s commits and refs, without any HTTP (a cheap fresh repo for tests)."""
        with self._lock:
            original = self._get_repo(repo_type, source) if (repo_type, source) in self._repos else None
            if original is None:
                raise KeyError(f"{repo_type} {source} does not exist")
            repo = Repo(repo_type, target, original.private)
            repo.commits, repo.branches = dict(original.commits), dict(original.branches)
            repo.tags = dict(original.tags)
            self._repos[(repo_type, target)] = repo

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``main``, newest first."""
        with self._lock:
            repo, head = self._lookup(repo_type, repo_id, "main")
            return [c.sha for c in repo.history(head)]

    def reset(self) -> None:
        """Delete every repo, LFS object and corruption."""
        with self._lock:
            self._repos.clear()
            self._lfs.clear()
            self._corrupted.clear()
            self._faults.clear()
            self._upload_failure = None

    # ----------------------------------------------------------------------------- storage helpers
    def _lookup(self, repo_type: str, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        """For the Python-side helpers: HTTP-flavoured errors become KeyError."""
        try:
            repo = self._get_repo(repo_type, repo_id)
            return repo, self._get_commit(repo, revision)
        except HubError as err:
            raise KeyError(f"{repo_type} {repo_id}@{revision}: {err.message}") from None

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict, title: str, message: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, sorted((p, b.blob_id) for p, b in tree.items()), title, self._counter])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, tree, title, message)
        repo.commits[commit.sha] = commit
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _served_bytes(self, repo: Repo, path: str, blob: Blob) -> bytes:
        if (repo.repo_type, repo.repo_id, path, blob.sha256) not in self._corrupted:
            return blob.data
        data = bytearray(blob.data)
        for i in {0, len(data) // 2, len(data) - 1}:  # flip bits at a few positions, keep the size
            if data:
                data[i] ^= 0xFF
        return bytes(data)

    def _ticket(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def set_hub_offline(monkeypatch, offline: bool = True) -> None:
    """Toggle huggingface_hub's offline mode for one test (undone by ``monkeypatch`` afterwards).

    Patches ``huggingface_hub.constants.HF_HUB_OFFLINE`` (what the client consults at call time),
    the by-value copies diffusers keeps in already-imported ``diffusers.*`` modules, and the
    environment variable (for subprocesses).  See the module docstring for the details.
    """
    import sys

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "diffusers" and isinstance(getattr(module, "HF_HUB_OFFLINE", None), bool):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", offline)


def _requested_privacy(payload: dict, current: bool) -> bool:
    """Client 2.x sends ``visibility`` ("public"/"private"/"protected"); older clients sent ``private``."""
    if "visibility" in payload:
        # "protected" (Spaces only) keeps the repo readable by everyone, so it is not private here.
        return payload["visibility"] == "private"
    if "private" in payload:
        return bool(payload["private"])
    return current


def _parse_front_matter(text: str) -> dict:
    """README.md YAML front matter -> dict ({} when absent or invalid)."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1)) if yaml is not None else _mini_yaml(match.group(1))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _mini_yaml(text: str) -> dict:
    """Tiny YAML subset used only without PyYAML: scalars, ``- item`` / ``[a, b]`` lists, one nested level."""

    def scalar(v: str):
        v = v.strip()
        if v.startswith("[") and v.endswith("]"):
            return [scalar(x) for x in v[1:-1].split(",") if x.strip()]
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            return v[1:-1]
        if re.fullmatch(r"-?\d+", v):
            return int(v)
        return {"true": True, "false": False, "null": None, "~": None, "": None}.get(v.lower(), v)

    root: dict = {}
    key = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indented = raw[0] in " \t"
        line = raw.strip()
        if line.startswith("- ") and key is not None:
            if not isinstance(root.get(key), list):
                root[key] = []
            root[key].append(scalar(line[2:]))
        elif indented and key is not None and ":" in line:
            if not isinstance(root.get(key), dict):
                root[key] = {}
            k, _, v = line.partition(":")
            root[key][k.strip()] = scalar(v)
        elif ":" in line:
            key, _, v = line.partition(":")
            key = key.strip()
            root[key] = scalar(v)
    return root


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the bound ``hub``. One instance per request (per connection in fact)."""

    hub: HubServer  # set on the subclass created by HubServer.start()
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    server_version = "FakeHub/1.0"

    # Never write anything (BaseHTTPRequestHandler logs to stderr by default).
    def log_message(self, format, *args):  # noqa: A002 - signature imposed by the base class
        pass

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    # ----------------------------------------------------------------------------- plumbing
    def _dispatch(self):
        parts = urlsplit(self.path)
        self.route = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.body = self._read_body()  # always drained, so keep-alive connections stay in sync
        self.hub.request_log.append((self.command, self.route))
        self.hub.header_log.append((self.command, self.route, {k: self.headers[k] for k in ("User-Agent", "Range")
                                                               if k in self.headers}))
        try:
            self._route()
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a bug in the fake should surface as a 500, not a hung client
            self._error(HubError(500, f"Internal error in fake hub: {type(exc).__name__}: {exc}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body")

    def _send(self, status: int, body=b"", headers: dict | None = None, content_type: str | None = None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body, default=str).encode()  # default=str: YAML dates in cardData
            content_type = content_type or "application/json; charset=utf-8"
        self.send_response(status)
        for key, value in (headers or {}).items():
            # Header values must be latin-1; paths and messages may not be, so escape them.
            self.send_header(key, str(value).encode("ascii", "backslashreplace").decode())
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, {"error": err.message}, headers)

    # ----------------------------------------------------------------------------- auth
    def _auth(self) -> bool:
        """True when a valid token was sent (or the server needs none). A wrong token is a 401."""
        header = self.headers.get("Authorization")
        if self.hub.token is None:
            return True
        if header is None:
            return False
        if not hmac.compare_digest(header.encode(), f"Bearer {self.hub.token}".encode()):
            raise HubError(401, INVALID_CREDENTIALS)
        return True

    def _require_auth(self):
        if not self._auth():
            raise HubError(401, INVALID_CREDENTIALS)

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        authed = self._auth()
        repo = self.hub._get_repo(repo_type, repo_id)
        if repo.private and not authed:
            # The Hub does not reveal private repos to anonymous users.
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    # ----------------------------------------------------------------------------- routing
    _API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+?)(?:/(.*))?$")
    _RESOLVE = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
    _LFS_BATCH = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
    _LFS_OBJECT = re.compile(r"^/_lfs/(upload|verify)/([0-9a-f]{64})$")

    def _route(self):
        route, method = self.route, self.command
        simple = {
            ("POST", "/api/repos/create"): self._create_repo,
            ("DELETE", "/api/repos/delete"): self._delete_repo,
            ("POST", "/api/validate-yaml"): lambda: self._send(200, {"errors": [], "warnings": []}),
            ("GET", "/api/whoami-v2"): self._whoami,
            # Fetched once a day by the client for agent detection; an empty registry disables it.
            ("GET", "/api/agent-harnesses"): lambda: self._send(200, {"standardEnvVars": [], "harnesses": {}}),
        }
        if (method, route) in simple:
            return simple[(method, route)]()
        if m := self._RESOLVE.match(route):
            if method in ("GET", "HEAD"):
                repo_type = URL_PREFIX_TO_TYPE[m.group(1) or ""]
                path = "/".join(unquote(s) for s in m.group(4).split("/"))
                return self._resolve(repo_type, unquote(m.group(2)), unquote(m.group(3)), path)
        if (m := self._LFS_BATCH.match(route)) and method == "POST":
            return self._lfs_batch(URL_PREFIX_TO_TYPE[m.group(1) or ""], unquote(m.group(2)))
        if m := self._LFS_OBJECT.match(route):
            if m.group(1) == "upload" and method == "PUT":
                return self._lfs_upload(m.group(2))
            if m.group(1) == "verify" and method == "POST":
                return self._lfs_verify(m.group(2))
        if m := self._API_REPO.match(route):
            repo_type, repo_id = PLURAL_TO_TYPE[m.group(1)], unquote(m.group(2))
            rest = [unquote(s) for s in (m.group(3) or "").split("/")] if m.group(3) else []
            return self._repo_api(method, repo_type, repo_id, rest)
        raise HubError(404, f"Not found: {method} {route}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]):
        action = rest[0] if rest else ""
        arg = rest[1] if len(rest) > 1 else "main"
        if method == "GET" and action == "":
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and len(rest) >= 2:
            return self._repo_info(repo_type, repo_id, "/".join(rest[1:]))
        if method == "POST" and action == "preupload":
            return self._preupload(repo_type, repo_id, arg)
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, arg)
        if method == "GET" and action == "tree":
            return self._tree(repo_type, repo_id, arg, "/".join(rest[2:]))
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo_type, repo_id, arg)
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "commits":
            return self._list_commits(repo_type, repo_id, arg)
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, rest[1])
        if action == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, rest[1])
        if action == "settings" and method == "PUT":
            return self._settings(repo_type, repo_id)
        raise HubError(404, f"Not found: {method} {self.route}")

    # ----------------------------------------------------------------------------- repos
    def _create_repo(self):
        self._require_auth()
        payload = self._json_body()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in URL_PREFIX:
            raise HubError(400, "Invalid repo name or type")
        repo_id = f"{org or 'tester'}/{name}"
        with self.hub._lock:
            existing = self.hub._repos.get((repo_type, repo_id))
            if existing is not None:
                body = {"error": "You already created this model repo", "url": self.hub._repo_url(existing)}
                return self._send(409, body, {"X-Error-Message": body["error"]})
            repo = Repo(repo_type, repo_id, _requested_privacy(payload, False))
            # An initial commit so that "main" resolves straight away, as on the Hub.
            tree = {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            commit = self.hub._new_commit(repo, None, tree, "initial commit", "")
            repo.branches["main"] = commit.sha
            self.hub._repos[(repo_type, repo_id)] = repo
            self._send(200, {"url": self.hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self):
        self._require_auth()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'tester'}/{payload.get('name')}"
        with self.hub._lock:
            self.hub._get_repo(repo_type, repo_id)
            del self.hub._repos[(repo_type, repo_id)]
        self._send(200, b"")

    def _settings(self, repo_type: str, repo_id: str):
        self._require_auth()
        payload = self._json_body()
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            repo.private = _requested_privacy(payload, repo.private)
        self._send(200, {})

    def _whoami(self):
        self._require_auth()
        self._send(200, {
            "type": "user", "name": "tester", "fullname": "Test User", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        })

    def _repo_info(self, repo_type: str, repo_id: str, revision: str):
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            commit = self.hub._get_commit(repo, revision)
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.tree):
            blob = commit.tree[path]
            entry = {"rfilename": path}
            if with_blobs:
                entry.update(size=blob.size, blobId=blob.blob_id)
                if blob.lfs:
                    entry["lfs"] = blob.lfs_json("sha256")
            siblings.append(entry)
        readme = commit.tree.get("README.md")
        card = _parse_front_matter(readme.data.decode("utf-8", "replace")) if readme else {}
        tags = [t for t in card.get("tags") or [] if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
        library = card.get("library_name")
        if isinstance(library, str) and library not in tags:
            tags.insert(0, library)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.sha, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
            "lastModified": _iso(commit.date), "createdAt": _iso(repo.created_at),
            "siblings": siblings, "cardData": card or None,
        }
        if repo_type == "model":
            info["library_name"] = library if isinstance(library, str) else None
            info["pipeline_tag"] = card.get("pipeline_tag")
        if repo_type == "space":
            info["sdk"] = card.get("sdk")
        self._send(200, info)

    # ----------------------------------------------------------------------------- uploads
    def _is_lfs(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        if size > LFS_THRESHOLD or b"\0" in sample:  # large or binary content never goes in git
            return True
        attributes = commit.tree.get(".gitattributes")
        text = attributes.data.decode("utf-8", "replace") if attributes else DEFAULT_GITATTRIBUTES
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and "filter=lfs" in fields[1:]:
                pattern = fields[0]
                target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                    return True
        return False

    def _preupload(self, repo_type: str, repo_id: str, revision: str):
        self._require_auth()
        payload = self._json_body()
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            commit = self.hub._get_commit(repo, revision)
            files = []
            for item in payload.get("files", []):
                sample = base64.b64decode(item.get("sample") or "")
                lfs = self._is_lfs(commit, item["path"], int(item.get("size") or 0), sample)
                existing = commit.tree.get(item["path"])
                files.append({
                    "path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                    "oid": existing.etag if existing is not None else None,
                })
        self._send(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_type: str, repo_id: str):
        self._require_auth()
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported by the fake hub")
        with self.hub._lock:
            self.hub._get_repo(repo_type, repo_id)
            objects = []
            for obj in payload.get("objects", []):
                oid, size = str(obj["oid"]), int(obj["size"])
                entry = {"oid": oid, "size": size, "authenticated": True}
                stored = self.hub._lfs.get(oid)
                if stored is None or len(stored) != size:  # already-stored objects get no actions
                    ticket = self.hub._ticket(oid, size)
                    entry["actions"] = {
                        "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}?size={size}&ticket={ticket}"},
                        "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}"},
                    }
                objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str):
        # Like a pre-signed S3 URL: no Authorization header, the signed ticket is the credential.
        size = int(self.query.get("size", ["-1"])[0])
        ticket = self.query.get("ticket", [""])[0]
        if not hmac.compare_digest(ticket, self.hub._ticket(oid, size)):
            raise HubError(403, "Invalid or expired upload URL")
        if self.hub._upload_failure is not None:
            raise HubError(self.hub._upload_failure, "injected upload failure")
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced sha256/size")
        with self.hub._lock:
            self.hub._lfs[oid] = self.body
        self._send(200, b"")

    def _lfs_verify(self, oid: str):
        self._require_auth()
        payload = self._json_body()
        with self.hub._lock:
            stored = self.hub._lfs.get(oid)
        if stored is None or payload.get("oid") != oid or len(stored) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found or size mismatch")
        self._send(200, {})

    def _commit(self, repo_type: str, repo_id: str, revision: str):
        self._require_auth()
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Invalid ndjson payload")
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "Missing commit header or summary")
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits can only target branches)",
                               "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = head
            wanted = header.get("parentCommit")
            if wanted:
                base = repo.resolve(wanted) if _HEX.fullmatch(wanted) else None
                if create_pr:  # a PR may start from an older commit
                    if base is None:
                        raise HubError(404, f"Invalid parent commit {wanted}", "RevisionNotFound")
                    parent = base
                elif base is None or base.sha != head.sha:
                    raise HubError(412, f"A commit has happened since {wanted}: {revision} is now at {head.sha}")
            tree = dict(parent.tree)  # work on a copy so a failing operation leaves the repo untouched
            for line in lines:
                self._apply(tree, line.get("key"), line.get("value") or {})
            commit = self.hub._new_commit(repo, parent.sha, tree, header["summary"], header.get("description", ""))
            pr_url = None
            if create_pr:
                repo.pr_count += 1
                repo.branches[f"refs/pr/{repo.pr_count}"] = commit.sha
                pr_url = f"{self.hub._repo_url(repo)}/discussions/{repo.pr_count}"
            else:
                repo.branches[revision] = commit.sha
            self._send(200, {
                "success": True, "commitOid": commit.sha, "pullRequestUrl": pr_url,
                "commitUrl": f"{self.hub._repo_url(repo)}/commit/{commit.sha}",
            })

    def _apply(self, tree: dict, key: str, value: dict) -> None:
        path = value.get("path", "")
        if key == "header":
            return
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, "Only base64 encoding is supported")
            tree[path] = Blob(base64.b64decode(value.get("content", "")), lfs=False)
        elif key == "lfsFile":
            data = self.hub._lfs.get(value.get("oid", ""))
            if data is None:
                raise HubError(400, f"LFS file {path} was not uploaded (oid {value.get('oid')})")
            if value.get("size") is not None and int(value["size"]) != len(data):
                raise HubError(400, f"Size mismatch for LFS file {path}")
            tree[path] = Blob(data, lfs=True)
        elif key == "deletedFile":
            if path not in tree:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in tree if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del tree[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key}")

    # ----------------------------------------------------------------------------- browsing
    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict | None:
        """Tree/paths-info entry for a file or directory at ``path`` (None when absent)."""
        blob = commit.tree.get(path)
        if blob is not None:
            entry = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = blob.lfs_json("oid")
        else:
            prefix = path.rstrip("/") + "/" if path else ""
            children = sorted((p, b.blob_id) for p, b in commit.tree.items() if p.startswith(prefix))
            if not children:
                return None
            oid = hashlib.sha1(json.dumps(children).encode()).hexdigest()  # stable, not git's real tree id
            entry = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.date)}
        return entry

    @staticmethod
    def _snapshot(commit: Commit, path: str):
        prefix = path + "/"
        return sorted((p, b.blob_id) for p, b in commit.tree.items() if p == path or p.startswith(prefix))

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """Newest commit in first-parent history that changed ``path`` (file or folder)."""
        last = commit
        current = self._snapshot(commit, path)
        for older in list(repo.history(commit))[1:]:
            if self._snapshot(older, path) != current:
                break
            last = older
        return last

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str):
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        path = path.strip("/")
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            commit = self.hub._get_commit(repo, revision)
            prefix = path + "/" if path else ""
            below = [p[len(prefix):] for p in commit.tree if p.startswith(prefix)]
            if path and not below:
                raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
            names = set()
            for rel in below:
                parts = rel.split("/")
                depth = len(parts) if recursive else 1
                for i in range(1, depth + 1):
                    names.add(prefix + "/".join(parts[:i]))
            entries = [self._entry(repo, commit, name, expand) for name in sorted(names)]
        self._send(200, entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str):
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = self._json_body()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            commit = self.hub._get_commit(repo, revision)
            entries = [self._entry(repo, commit, p.strip("/"), expand) for p in paths]
        self._send(200, [e for e in entries if e is not None])

    def _refs(self, repo_type: str, repo_id: str):
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                        for n, s in repo.branches.items() if not n.startswith("refs/pr/")]
            prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in repo.branches.items()
                   if n.startswith("refs/pr/")]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()]
        body = {"branches": branches, "tags": tags, "converts": []}
        if self.query.get("include_prs", ["0"])[0] in ("1", "true", "True"):
            body["pullRequests"] = prs
        self._send(200, body)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str):
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            head = self.hub._get_commit(repo, revision)
            items = [{"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": "tester"}],
                      "date": _iso(c.date)} for c in repo.history(head)]
        self._send(200, items)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str):
        self._require_auth()
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            if method == "DELETE":
                if branch not in repo.branches or branch == "main":
                    raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}",
                                   "RevisionNotFound" if branch != "main" else None)
                del repo.branches[branch]
                return self._send(200, {})
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._json_body().get("startingPoint") or "main"
            repo.branches[branch] = self.hub._get_commit(repo, start).sha
        self._send(200, {})

    def _tag(self, method: str, repo_type: str, repo_id: str, name: str):
        self._require_auth()
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            if method == "DELETE":
                if repo.tags.pop(name, None) is None:
                    raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
                return self._send(200, {})
            tag = self._json_body().get("tag")
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self.hub._get_commit(repo, name).sha  # URL names the revision to tag
        self._send(200, {})

    # ----------------------------------------------------------------------------- downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        with self.hub._lock:
            repo = self._readable_repo(repo_type, repo_id)
            commit = self.hub._get_commit(repo, revision)
            blob = commit.tree.get(path)
            if blob is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            data = self.hub._served_bytes(repo, path, blob)
            fault = self.hub._faults.get((repo_type, repo_id, path))
        if fault is not None and self.command not in fault.methods:
            fault = None
        if fault is not None and fault.status is not None:
            raise HubError(fault.status, f"injected HTTP {fault.status}", fault.error_code)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        if fault is not None:
            for key, value in fault.headers.items():
                targets = [key] + (["X-Linked-Etag"] if key == "ETag" and blob.lfs else [])
                for target in targets:
                    if value is None:
                        headers.pop(target, None)
                    else:
                        headers[target] = value
            if fault.short is not None and self.command == "GET":
                data = data[:fault.short]
        byte_range = self.headers.get("Range")
        if byte_range:
            span = _parse_range(byte_range, len(data))
            if span is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", headers)
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")



def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> inclusive (start, end), or None."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last n bytes
        n = int(last)
        if n == 0:
            return None
        return max(size - n, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end
