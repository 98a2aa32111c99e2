"""Hugging Face Hub access, through ``huggingface_hub`` only: downloads with clear errors, integrity checks.

Everything goes through the Hub cache (``HF_HOME`` / ``HF_HUB_CACHE``), so revision pinning and offline
mode (``HF_HUB_OFFLINE=1``, read by huggingface_hub when it is imported) behave as for any Hub model.

Integrity: a file whose sha256 is known (from ``clear_config.json`` or the registry) is hashed after every
fetch; small files without one are checked against the content hash the cache stores them under (git
blob sha1 or sha256). A file that fails is *removed from the cache* before :class:`IntegrityError` is
raised, so the next call downloads it again instead of reusing the corrupt copy forever.

Tokens are passed to huggingface_hub and nowhere else: no message, log line or file written here holds one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

from .errors import (ClearAdapterError, HubAuthError, HubError, HubNotFoundError, HubServerError, IntegrityError,
                     InvalidArgumentError, MalformedResponseError, OfflineError)

logger = logging.getLogger("clear_adapters")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HEX = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
#: How clear_adapters introduces itself to the Hub (user agent of downloads), as diffusers and peft do.
LIBRARY_NAME = "clear-adapters"
#: Files without a known sha256 are checked against their cache blob name up to this size; above it
#: hashing on every load costs seconds, so pin a sha256 (registry / clear_config.json) instead.
BLOB_CHECK_MAX_BYTES = 64 << 20


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode now (``HF_HUB_OFFLINE`` as it read it)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _known_tokens(token) -> list[str]:
    tokens = [token] if isinstance(token, str) and token else []
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            tokens.append(stored)
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        tokens.append(env)
    return [t for t in tokens if len(t) >= 4]


def scrub(text: str, token=None) -> str:
    """``text`` with every Hub token we know of replaced by ``***`` (for messages built from server text)."""
    for secret in _known_tokens(token):
        text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def translate_errors(repo_id: str, *, filename: str | None = None, revision: str | None = None,
                     action: str = "download", token=None):
    """Turn huggingface_hub / HTTP errors into clear_adapters errors that say what to do.

    Each HTTP status keeps its meaning (auth, not found, server error, malformed answer) and its
    number, also when huggingface_hub wraps it in "cannot find the file in the cache" (it does for
    any failed metadata request); only connection failures are reported as "cannot be reached".
    Chaining is cut (``from None``): the client's messages add nothing the user can act on and a
    foreign exception is the one place a secret could slip into a traceback.
    """
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}/{filename}" if filename else repo_id
    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except hf_errors.HFValidationError as exc:  # before ValueError: it is one
        raise InvalidArgumentError(f"cannot {action} {where}: {_shown(scrub(str(exc), token))}") from None
    except hf_errors.OfflineModeIsEnabled:
        raise OfflineError(f"cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach "
                           "the Hub") from None
    except hf_errors.RevisionNotFoundError:
        raise HubNotFoundError(f"revision {revision!r} not found in Hub repository {repo_id}; check the branch, tag "
                               "or commit (clear-adapters info REPO lists what is there)", status=404) from None
    except hf_errors.RemoteEntryNotFoundError:
        hint = ("is it a CLEAR adapter repository (pushed with clear-adapters push)?" if filename == "clear_config.json"
                else "check the file name and the revision")
        raise HubNotFoundError(f"{filename or 'the file'} not found in {repo_id}{at} on the Hub; {hint}",
                               status=404) from None
    except hf_errors.GatedRepoError:
        raise HubAuthError(f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login)",
                           status=403) from None
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubNotFoundError(f"Hub repository {repo_id} not found (or private: log in with a token that can read "
                               "it, e.g. hf auth login or HF_TOKEN)", status=_status(exc)) from None
    except hf_errors.LocalEntryNotFoundError as exc:
        # huggingface_hub raises this for *every* failed metadata request of an uncached file; the
        # real cause (an HTTP status, a malformed answer, a connection failure) is its __cause__.
        cause = _cause(exc, (hf_errors.HfHubHTTPError, hf_errors.FileMetadataError))
        if isinstance(cause, hf_errors.HfHubHTTPError) and _status(cause) is not None:
            raise _http_error(cause, action, where, token) from None
        if isinstance(cause, hf_errors.FileMetadataError):
            missing = "X-Repo-Commit" if "X-Repo-Commit" in str(cause) else "ETag" if "ETag" in str(cause) else None
            raise MalformedResponseError(
                f"cannot {action} {where}: the server's answer lacks the "
                f"{missing + ' header' if missing else 'file metadata'} every Hub endpoint sends; HF_ENDPOINT "
                f"({_endpoint()}) may not be a Hub, or a proxy strips headers") from None
        if is_offline():
            raise OfflineError(f"{where}{at} is not in the local Hub cache and offline mode is on "
                               "(HF_HUB_OFFLINE=1); download it once while online, or unset HF_HUB_OFFLINE") from None
        raise OfflineError(f"{where}{at} is not in the local Hub cache and the Hub cannot be reached "
                           "(network down or HF_ENDPOINT wrong); retry when online") from None
    except hf_errors.HfHubHTTPError as exc:
        raise _http_error(exc, action, where, token) from None
    except _transport_errors() as exc:
        raise OfflineError(f"cannot {action} {where}: the Hub cannot be reached ({type(exc).__name__}); check the "
                           "network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files") from None
    except RuntimeError as exc:  # e.g. "Error while uploading 'x' to the Hub." around the HTTP error
        failed = re.search(r"uploading '([^']+)'", str(exc))
        cause = _cause(exc, (hf_errors.HfHubHTTPError,))
        place = f"{repo_id}/{failed.group(1)}" if failed else where
        if cause is not None and _status(cause) is not None:
            raise _http_error(cause, action, place, token) from None
        cause = _cause(exc, _transport_errors())
        if cause is not None:
            raise OfflineError(f"cannot {action} {place}: the connection failed ({type(cause).__name__}); retry")\
                from None
        raise HubError(f"cannot {action} {place}: {_shown(scrub(str(exc), token))}") from None
    except OSError as exc:
        if "Consistency check failed" in str(exc):  # fewer bytes arrived than the server announced
            sizes = re.search(r"size (\d+) but has size (\d+)", str(exc))
            got = f" ({sizes.group(2)} of {sizes.group(1)} bytes)" if sizes else ""
            raise MalformedResponseError(f"cannot {action} {where}: the download was incomplete{got}; nothing was "
                                         "kept in the cache — retry") from None
        raise ClearAdapterError(f"cannot {action} {where}: {_shown(scrub(str(exc), token))}") from None
    except ValueError as exc:
        if "pointer path" in str(exc):  # huggingface_hub's own guard against a path-like commit id
            raise MalformedResponseError(f"cannot {action} {where}: the server sent an X-Repo-Commit header that "
                                         "is not a commit id") from None
        raise HubError(f"cannot {action} {where}: {_shown(scrub(str(exc), token))}") from None


def _status(exc) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _cause(exc: BaseException, types) -> BaseException | None:
    """The first exception of ``types`` in ``exc``'s cause/context chain (``exc`` itself excluded)."""
    seen, current = set(), exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _http_error(exc, action: str, where: str, token) -> HubError:
    """The clear_adapters error for an HTTP error status, with the status in the message and ``.status``."""
    status = _status(exc)
    detail = scrub(str(getattr(exc, "server_message", "") or ""), token).strip()
    detail = f" ({_shown(detail)})" if detail else ""
    if status in (401, 403):
        return HubAuthError(f"the Hub refused to let you {action} {where} (HTTP {status}){detail}: check that your "
                            "token is valid and has the needed (write) permission — hf auth login or HF_TOKEN",
                            status=status)
    if status == 404:
        return HubNotFoundError(f"cannot {action} {where}: not found on the Hub (HTTP 404){detail}; check the "
                                "repository, file name and revision", status=status)
    if status == 412:
        return HubError(f"{where} changed while pushing (someone else committed); push again (HTTP 412)",
                        status=status)
    if status == 429:
        return HubError(f"cannot {action} {where}: rate limited by the Hub (HTTP 429){detail}; wait and retry",
                        status=status)
    if status is not None and status >= 500:
        return HubServerError(f"cannot {action} {where}: the Hub answered with a server error (HTTP {status})"
                              f"{detail}; it may be down — retry later", status=status)
    return HubError(f"cannot {action} {where}: HTTP {status}{detail}", status=status)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _shown(text: str) -> str:
    return text if len(text) <= 300 else text[:300] + "..."


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x talks HTTP through httpx2 (earlier releases: httpx); both raise TransportError
    # subclasses for refused connections and timeouts.
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError, ConnectionError)
        except (ImportError, AttributeError):
            continue
    return (ConnectionError,)


def download(repo_id: str, filename: str, *, revision: str | None = None, token: str | bool | None = None,
             sha256: str | None = None, cache_dir: str | Path | None = None, local_files_only: bool = False,
             force_download: bool = False, missing_ok: bool = False) -> Path | None:
    """Fetch ``filename`` of ``repo_id`` into the Hub cache (or find it there offline) and verify it.

    With ``sha256`` the file must hash to it; otherwise a small file is checked against the hash it is
    cached under. A file that fails is removed from the cache, then :class:`IntegrityError` is raised.
    Errors are translated into clear_adapters errors that say what to do; the token never appears in them.
    ``cache_dir``, ``local_files_only`` and ``force_download`` mean what they mean for diffusers loaders;
    ``missing_ok`` returns None when the repo (at that revision) has no such file.
    The server's ``ETag`` and ``X-Repo-Commit`` become cache paths inside huggingface_hub, so they are
    checked first (:class:`MalformedResponseError` when path-like), and the file returned must lie
    inside this repository's cache folder before anything reads it.
    """
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from . import __version__

    with translate_errors(repo_id, filename=filename, revision=revision, token=token):
        if not local_files_only:
            _check_served_names(repo_id, filename, revision, token, cache_dir=cache_dir, force=force_download)
        try:
            path = Path(huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, force_download=force_download,
                library_name=LIBRARY_NAME, library_version=__version__))
        except EntryNotFoundError as exc:
            # the Hub said "no such file" (now, or earlier: the cache remembers it), not "cannot reach"
            if missing_ok and not isinstance(exc, LocalEntryNotFoundError):
                return None
            if not isinstance(exc, LocalEntryNotFoundError) or not local_files_only:
                raise
            at = f" at revision {revision!r}" if revision else ""
            raise OfflineError(f"{repo_id}/{filename}{at} is not in the local Hub cache and local_files_only=True; "
                               "load it once without local_files_only to download it") from None
    _check_inside_cache(path, repo_id, filename, cache_dir=cache_dir)
    if sha256:
        verify_sha256(path, sha256, evict=True, cache_dir=cache_dir)
    else:
        verify_cached_blob(path, cache_dir=cache_dir)
    logger.debug("fetched %s/%s at %s", repo_id, filename, commit_of(path, filename) or revision or "main")
    return path


def hub_api(token=None):
    """An ``HfApi`` that introduces itself as clear-adapters (``library_name``/``library_version``)."""
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def remote_header(repo_id: str, filename: str, *, revision: str | None = None, token=None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file on the Hub, read with a range request (no download)."""
    with translate_errors(repo_id, filename=filename, revision=revision, action="read the header of", token=token):
        info = hub_api(token).parse_safetensors_file_metadata(repo_id, filename, revision=revision, token=token)
    return dict(info.metadata or {})


def safetensors_files(repo_id: str, *, subfolder: str | None = None, revision: str | None = None,
                      token=None) -> tuple[list[str], str]:
    """(``.safetensors`` files directly in ``subfolder`` of the repo, the commit listed). Needs the Hub."""
    with translate_errors(repo_id, revision=revision, action="list the files of", token=token):
        info = hub_api(token).model_info(repo_id, revision=revision, token=token)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = [s.rfilename[len(prefix):] for s in info.siblings or [] if s.rfilename.startswith(prefix)]
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n), info.sha


def _safe_name(value: str) -> bool:
    """Whether a server-chosen name can be one cache path component (no separators, no ``..``)."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\\\0") and len(value) <= 255


def _check_served_names(repo_id: str, filename: str, revision: str | None, token, *,
                        cache_dir: str | Path | None = None, force: bool = False) -> None:
    """Refuse a server whose ETag or X-Repo-Commit for this file is not a plain name.

    huggingface_hub stores a download at ``blobs/<ETag>`` and links it from ``snapshots/<commit>``
    without checking the ETag, so a forged one (``../../x`` or ``/home/me/x``) makes *it* read an
    existing file there as the download, or write the download there. This HEAD request catches
    such a server before huggingface_hub acts on its answer. It costs one request and is skipped
    when the file is already cached at a commit (no request at all then, unless ``force``) or offline;
    any failure is left to the download call, whose own request reports it.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cached = revision and _COMMIT.match(revision) and isinstance(
        try_to_load_from_cache(repo_id, filename, revision=revision, cache_dir=cache_dir), str)
    if constants.is_offline_mode() or (cached and not force):
        return
    try:
        from . import __version__

        metadata = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token,
                                        library_name=LIBRARY_NAME, library_version=__version__)
    except Exception:  # noqa: BLE001 - reported by hf_hub_download's own request, translated by the caller
        return
    for header, value in (("ETag", metadata.etag), ("X-Repo-Commit", metadata.commit_hash)):
        if header == "X-Repo-Commit" and value is not None and not _COMMIT.match(value):
            raise MalformedResponseError(
                f"refusing to download {repo_id}/{filename}: the server sent X-Repo-Commit {_shown(value)!r}, which "
                f"is not a commit id (40 hex digits); check HF_ENDPOINT ({constants.ENDPOINT}) and any proxy")
        if value is not None and not _safe_name(value):
            raise MalformedResponseError(
                f"refusing to download {repo_id}/{filename}: the server sent {header} {_shown(value)!r}, which is "
                "not a content hash or commit id but a file path; huggingface_hub would use it as a path outside "
                f"the Hub cache. Check HF_ENDPOINT ({constants.ENDPOINT}) and any proxy")


def _repo_cache(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id,
                                                                                    repo_type="model")


def _check_inside_cache(path: Path, repo_id: str, filename: str, *, cache_dir: str | Path | None = None) -> None:
    """Refuse to read a returned file that resolves outside ``repo_id``'s cache folder (forged ETag)."""
    folder = _repo_cache(repo_id, cache_dir).resolve()
    if _is_within(path.resolve(), folder):
        return
    if path.is_symlink() and _is_within(Path(os.path.abspath(path)), folder):
        path.unlink()  # our link in the cache goes; the file it named, outside the cache, is not touched
    raise MalformedResponseError(
        f"refusing to read {repo_id}/{filename}: the server's ETag made huggingface_hub store it at "
        f"{_shown(str(path.resolve()))}, outside the Hub cache ({folder}); that file was not read or removed — "
        "check HF_ENDPOINT and any proxy, and inspect that path")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def commit_of(path: str | Path, filename: str) -> str | None:
    """The commit a file returned by ``hf_hub_download`` belongs to (its ``snapshots/<commit>`` folder).

    Used to pin the weights to the commit the config came from, online or offline. None when the
    path is not in the Hub cache layout.
    """
    snapshot = Path(path)
    for _ in Path(filename).parts:
        snapshot = snapshot.parent
    if snapshot.parent.name == "snapshots" and _COMMIT.match(snapshot.name):
        return snapshot.name
    return None


def _hash_file(digest, path: str | Path) -> str:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return _hash_file(hashlib.sha256(), path)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_file_sha1(path: str | Path) -> str:
    """:func:`git_blob_sha1` of a file, without reading it into memory at once."""
    return _hash_file(hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size), path)


def verify_sha256(path: str | Path, expected: str, *, evict: bool = False, cache_dir: str | Path | None = None) -> None:
    """Raise :class:`IntegrityError` unless ``path`` hashes to ``expected``.

    ``evict`` (for files in the Hub cache) deletes the bad copy first, so a retry downloads it again.
    """
    actual = file_sha256(path)
    if actual == expected.lower():
        return
    name = Path(path).name
    if evict and evict_cached_file(path, cache_dir=cache_dir):
        raise IntegrityError(f"{name}: sha256 {actual} does not match the expected {expected}; the download is "
                             "corrupt (or the file on the Hub does not match its clear_config.json). The bad copy "
                             "was removed from the Hub cache: retry, and if it fails again tell the adapter's "
                             "author")
    raise IntegrityError(f"{name}: sha256 {actual} does not match the expected {expected}; the file is corrupt "
                         f"or was replaced after it was recorded — delete {path} and fetch or save it again")


def verify_cached_blob(path: str | Path, *, cache_dir: str | Path | None = None) -> None:
    """Check a cached file against the content hash its cache blob is named after (small files only)."""
    path = Path(path)
    if not path.is_symlink():
        return  # no symlinks (e.g. Windows without developer mode): the blob name is not visible
    blob = path.resolve()
    if not _HEX.match(blob.name) or blob.parent.name != "blobs" or blob.stat().st_size > BLOB_CHECK_MAX_BYTES:
        return
    data = blob.read_bytes()
    actual = hashlib.sha256(data).hexdigest() if len(blob.name) == 64 else git_blob_sha1(data)
    if actual != blob.name:
        evict_cached_file(path, cache_dir=cache_dir)
        raise IntegrityError(f"{path.name}: content does not match the hash the Hub served it under ({blob.name}); "
                             "the download is corrupt. The bad copy was removed from the Hub cache: retry")


def evict_cached_file(path: str | Path, *, cache_dir: str | Path | None = None) -> bool:
    """Remove a file (snapshot link and its blob) from the Hub cache (``cache_dir`` when the download used
    one); never touches anything outside it.

    The link is removed only if it lies in the cache, its blob only if the blob resolves inside the
    ``blobs`` folder of the same repository's cache folder (a forged ETag can point it anywhere).
    """
    from huggingface_hub import constants

    path = Path(path)
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
    location = Path(os.path.abspath(path))
    if not _is_within(location, cache):
        location = path.parent.resolve() / path.name  # the cache folder itself may be reached through a symlink
        if not _is_within(location, cache):
            return False
    relative = location.relative_to(cache).parts
    if len(relative) < 2:
        return False
    blobs = cache / relative[0] / "blobs"
    blob = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None and blob.parent == blobs.resolve() and _is_within(blob, cache):
        blob.unlink(missing_ok=True)
    logger.warning("removed corrupt %s from the Hub cache", path.name)
    return True
