"""Hugging Face Hub access, through ``huggingface_hub`` only: downloads with clear errors, sha256 checks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .errors import AdapterNotFoundError, HubAuthError, HubError, IntegrityError, OfflineError

logger = logging.getLogger("clear_adapters")


def download(repo_id: str, filename: str, *, revision: str | None = None, token: str | bool | None = None,
             sha256: str | None = None) -> Path:
    """Fetch ``filename`` of ``repo_id`` into the Hub cache (or find it there offline) and verify it.

    Errors are translated into clear_adapters errors that say what to do; the token never appears in them.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        path = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, token=token))
    except hf_errors.LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass of it
        raise OfflineError(f"{repo_id}/{filename} is not in the local Hub cache and the Hub cannot be reached "
                           "(offline mode or no network); download it once while online") from None
    except hf_errors.RevisionNotFoundError:
        raise AdapterNotFoundError(f"revision {revision!r} not found in {repo_id}") from None
    except hf_errors.EntryNotFoundError:
        raise AdapterNotFoundError(f"{filename} not found in {repo_id}"
                                   + (f" at revision {revision}" if revision else "")) from None
    except hf_errors.GatedRepoError:
        raise HubAuthError(f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login)") from None
    except hf_errors.RepositoryNotFoundError:
        raise AdapterNotFoundError(f"Hub repository {repo_id} not found (or private: log in with a token "
                                   "that can read it)") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubAuthError(f"the Hub refused access to {repo_id} (HTTP {status}); check your token") from None
        raise HubError(f"download of {repo_id}/{filename} failed (HTTP {status})") from None
    if sha256:
        verify_sha256(path, sha256)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected.lower():
        raise IntegrityError(f"{Path(path).name}: sha256 {actual} does not match the expected {expected}; the "
                             "download is corrupt or the file was replaced — delete it from the cache and retry")
