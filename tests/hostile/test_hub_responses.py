"""Hostile Hub responses: wrong statuses, missing or forged headers and short bodies from the server.

The real ``huggingface_hub`` client talks to the local server of ``tests/hub_server.py``, which
misbehaves on purpose (``HubServer.inject``). Each test asserts the exact error class, that the message
names the file and the status or header, that the pipeline is bit-identical afterwards and that
nothing outside the Hub cache was touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import clear_adapters
from clear_adapters import (HubAuthError, HubError, HubNotFoundError, HubServerError, IntegrityError,
                            MalformedResponseError, OfflineError)

from ._helpers import assert_unchanged, snapshot, unique_repo

CONFIG = "clear_config.json"
WEIGHTS = "clear_adapter.safetensors"


@pytest.fixture(scope="module")
def pushed(adapter_dir):
    name = unique_repo("hostile-template")
    clear_adapters.push(adapter_dir, name)
    return name


@pytest.fixture
def repo(pushed, hub_server):
    """A repository of its own (nothing of it cached yet) holding the adapter; faults cleared afterwards."""
    name = unique_repo("hostile")
    hub_server.copy_repo(pushed, name)
    yield name
    hub_server.clear_faults()


def storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def refused(pipe, repo_id, error, match, **kwargs):
    before = snapshot(pipe)
    with pytest.raises(error, match=match) as info:
        clear_adapters.load(repo_id, pipe, **kwargs)
    assert type(info.value) is error, type(info.value)
    assert_unchanged(pipe, before)
    return info.value


@pytest.mark.parametrize("status,code,error,match", [
    (400, None, HubError, "HTTP 400"),
    (403, None, HubAuthError, "HTTP 403"),
    (404, None, HubNotFoundError, "HTTP 404"),
    (500, None, HubServerError, "HTTP 500"),
    (503, None, HubServerError, "HTTP 503"),
    (429, None, HubError, "HTTP 429"),
])
@pytest.mark.parametrize("target", [CONFIG, WEIGHTS])
def test_head_status_gets_its_own_error_with_the_status(pipe, repo, hub_server, no_backoff, status, code, error,
                                                        match, target):
    hub_server.inject(repo, target, methods=("HEAD",), status=status, error_code=code)
    err = refused(pipe, repo, error, rf"{target}.*{match}")
    assert err.status == status
    assert "network down" not in str(err) and "cannot be reached" not in str(err)


@pytest.mark.parametrize("header", ["X-Repo-Commit", "ETag"])
@pytest.mark.parametrize("target", [CONFIG, WEIGHTS])
def test_missing_metadata_headers_are_malformed_responses(pipe, repo, hub_server, header, target):
    hub_server.inject(repo, target, headers={header: None, **({"X-Linked-Etag": None} if header == "ETag" else {})})
    refused(pipe, repo, MalformedResponseError, rf"{target}.*{header}")


def _victim(tmp_path) -> Path:
    victim = tmp_path / "outside" / "blobs" / "victim"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"precious data outside the Hub cache")
    return victim


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_forged_etag_never_deletes_or_reads_a_file_outside_the_cache(pipe, repo, hub_server, tmp_path, form):
    victim = _victim(tmp_path)
    clear_adapters.describe(repo)  # the config is cached: the repo's blobs folder exists
    etag = os.path.relpath(victim, storage(repo) / "blobs") if form == "relative" else str(victim)
    hub_server.inject(repo, WEIGHTS, headers={"ETag": f'"{etag}"'})
    refused(pipe, repo, MalformedResponseError, rf"{WEIGHTS}.*ETag")
    assert victim.read_bytes() == b"precious data outside the Hub cache"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]


def test_a_file_resolving_outside_the_cache_is_never_read_even_if_the_first_answer_was_honest(
        pipe, repo, hub_server, tmp_path, monkeypatch):
    from clear_adapters import hub

    victim = _victim(tmp_path)
    clear_adapters.describe(repo)
    # a server that answers the metadata check honestly and the download's own request with a forged ETag
    monkeypatch.setattr(hub, "_check_served_names", lambda *args, **kwargs: None)
    hub_server.inject(repo, WEIGHTS, headers={"ETag": f'"{victim}"'})
    refused(pipe, repo, MalformedResponseError, rf"{WEIGHTS}.*outside the Hub cache")
    assert victim.read_bytes() == b"precious data outside the Hub cache"
    assert not any(p.is_symlink() and not p.exists() or p.name == WEIGHTS for p in storage(repo).rglob("*")), \
        "the link to the outside file stayed in the cache"


def test_forged_etag_on_an_uncached_file_writes_nothing_outside_the_cache(pipe, repo, hub_server, tmp_path):
    target = tmp_path / "outside" / "blobs" / "planted"
    hub_server.inject(repo, CONFIG, headers={"ETag": f'"{target}"'})
    refused(pipe, repo, MalformedResponseError, rf"{CONFIG}.*ETag")
    assert not (tmp_path / "outside").exists()


def test_forged_commit_header_is_a_malformed_response(pipe, repo, hub_server):
    hub_server.inject(repo, CONFIG, headers={"X-Repo-Commit": "../../../../escaped"})
    refused(pipe, repo, MalformedResponseError, rf"{CONFIG}.*X-Repo-Commit")


@pytest.mark.parametrize("target", [CONFIG, WEIGHTS])
def test_short_body_is_a_malformed_response_and_nothing_stays_cached(pipe, repo, hub_server, target):
    hub_server.inject(repo, target, short=7)
    refused(pipe, repo, MalformedResponseError, rf"{target}.*incomplete")
    hub_server.clear_faults()
    handle = clear_adapters.load(repo, pipe)  # the next try downloads it whole
    assert handle.active
    clear_adapters.unload(pipe)


def test_server_errors_on_download_get_are_server_errors(pipe, repo, hub_server, no_backoff):
    hub_server.inject(repo, WEIGHTS, methods=("GET",), status=502)
    refused(pipe, repo, HubServerError, rf"{WEIGHTS}.*HTTP 502")


def test_connection_failures_are_still_offline_errors(pipe, monkeypatch, no_backoff):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    refused(pipe, unique_repo("unreachable"), OfflineError, "cannot be reached")


def test_cache_eviction_never_follows_a_link_out_of_the_repo_cache(tmp_path):
    from clear_adapters import hub

    victim = _victim(tmp_path)
    folder = storage(unique_repo("evict"))
    link = folder / "snapshots" / ("0" * 40) / WEIGHTS
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(victim, link.parent))
    with pytest.raises(IntegrityError, match=WEIGHTS):
        hub.verify_sha256(link, "0" * 64, evict=True)
    assert victim.read_bytes() == b"precious data outside the Hub cache"
    assert not link.is_symlink()  # the link in the cache is gone, its target outside is not
