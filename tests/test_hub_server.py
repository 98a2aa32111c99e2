"""Tests of the fake Hub in ``hub_server.py``, driven through the real ``huggingface_hub`` client.

The ``hub_server`` fixture (tests/conftest.py) returns the running ``HubServer``; ``HF_ENDPOINT``
and ``HF_TOKEN`` already point the client at it.  Every test works in its own uniquely named repo.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import sys
import types
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import huggingface_hub.constants
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hub_server import HubServer, set_hub_offline  # tests/ is on sys.path (see conftest.py)

README = """---
license: apache-2.0
library_name: diffusers
tags:
- flux
- lora
base_model: black-forest-labs/FLUX.1-dev
---
# Test card
"""


# The client itself PUTs LFS objects with httpx's deprecated ``data=<file>`` form (huggingface_hub/lfs.py).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _weights() -> bytes:
    return save_safetensors({"lora_A": np.arange(64, dtype=np.float32).reshape(8, 8)})


@pytest.fixture
def api(hub_server) -> HfApi:
    return HfApi()


@pytest.fixture
def repo_id(api) -> str:
    rid = f"tester/t-{uuid.uuid4().hex[:12]}"
    api.create_repo(rid)
    return rid


def _get(url: str, headers: dict | None = None):
    """Plain stdlib GET, to look at raw responses the client normally hides."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


# ------------------------------------------------------------------------------------- repos
def test_create_repo_and_exist_ok(hub_server, api):
    rid = f"tester/t-{uuid.uuid4().hex[:12]}"
    url = api.create_repo(rid)
    assert url.repo_id == rid and url.endpoint == hub_server.url
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(rid)
    assert exc.value.response.status_code == 409
    assert api.create_repo(rid, exist_ok=True).repo_id == rid

    info = api.model_info(rid)
    assert len(info.sha) == 40 and info.sha == hub_server.commits(rid)[0]
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # initial commit


def test_dataset_repo_roundtrip(hub_server, api):
    rid = f"tester/d-{uuid.uuid4().hex[:12]}"
    url = api.create_repo(rid, repo_type="dataset")
    assert url.repo_type == "dataset"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=rid, repo_type="dataset")
    path = hf_hub_download(rid, "data/train.csv", repo_type="dataset")
    assert _read(path) == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(rid)  # same id, wrong type


def test_delete_repo(api, repo_id):
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


# ------------------------------------------------------------------------------------- uploads & info
def test_upload_regular_and_lfs_then_model_info(hub_server, api, repo_id):
    weights = _weights()
    api.upload_file(path_or_fileobj=README.encode(), path_in_repo="README.md", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b'{"r": 4}', path_in_repo="config.json", repo_id=repo_id)
    api.upload_file(path_or_fileobj=weights, path_in_repo="lora.safetensors", repo_id=repo_id)
    assert len(hub_server.commits(repo_id)) == 4

    info = api.model_info(repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "lora.safetensors"}
    assert siblings["config.json"].lfs is None and siblings["config.json"].size == 8
    lfs = siblings["lora.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.size == len(weights)
    assert info.card_data["library_name"] == "diffusers"
    assert info.card_data["tags"] == ["flux", "lora"]
    assert info.card_data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert info.library_name == "diffusers"
    assert {"diffusers", "flux", "lora"} <= set(info.tags)


def test_hf_hub_download_regular_and_lfs(api, repo_id):
    weights = _weights()
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="sub/hello.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=weights, path_in_repo="lora.safetensors", repo_id=repo_id)
    assert _read(hf_hub_download(repo_id, "sub/hello.txt")) == b"hello"
    assert _read(hf_hub_download(repo_id, "lora.safetensors")) == weights
    api.upload_file(path_or_fileobj=b"odd", path_in_repo="with space/\u00fcml#aut?.txt", repo_id=repo_id)
    assert _read(hf_hub_download(repo_id, "with space/\u00fcml#aut?.txt")) == b"odd"

    folder = snapshot_download(repo_id)
    assert _read(f"{folder}/sub/hello.txt") == b"hello"
    assert _read(f"{folder}/lora.safetensors") == weights


def test_resolve_headers(hub_server, api, repo_id):
    weights = _weights()
    api.upload_file(path_or_fileobj=weights, path_in_repo="lora.safetensors", repo_id=repo_id)
    head = hub_server.commits(repo_id)[0]
    status, headers, body = _get(f"{hub_server.url}/{repo_id}/resolve/main/lora.safetensors")
    sha256 = hashlib.sha256(weights).hexdigest()
    assert status == 200 and body == weights
    assert headers["X-Repo-Commit"] == head
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{sha256}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(weights))


def test_revision_pinning(hub_server, api, repo_id):
    old = api.upload_file(path_or_fileobj=b"v1", path_in_repo="file.txt", repo_id=repo_id).oid
    new = api.upload_file(path_or_fileobj=b"v2", path_in_repo="file.txt", repo_id=repo_id).oid
    assert hub_server.commits(repo_id)[:2] == [new, old]
    assert _read(hf_hub_download(repo_id, "file.txt", revision=old)) == b"v1"
    assert _read(hf_hub_download(repo_id, "file.txt")) == b"v2"
    assert api.model_info(repo_id, revision=old[:7]).sha == old  # unique short sha prefix
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [new, old]


def test_branches_and_pull_requests(api, repo_id):
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="x.txt", repo_id=repo_id, revision="dev")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="x.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"

    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert _read(hf_hub_download(repo_id, "x.txt", revision="dev")) == b"dev"
    # "refs/pr/1" travels URL-quoted as one path segment.
    assert _read(hf_hub_download(repo_id, "x.txt", revision="refs/pr/1")) == b"pr"
    assert "x.txt" not in api.list_repo_files(repo_id)  # main untouched


def test_lfs_batch_protocol_with_chunked_upload(hub_server, repo_id):
    """Raw LFS batch -> chunked PUT -> verify; a stored object then gets no actions; bad bytes are refused."""
    data = b"\x00lfs-object" * 100
    oid = hashlib.sha256(data).hexdigest()
    auth = {"Authorization": f"Bearer {hub_server.token}", "Content-Type": "application/vnd.git-lfs+json"}

    def batch():
        body = json.dumps({"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                           "objects": [{"oid": oid, "size": len(data)}]}).encode()
        req = urllib.request.Request(f"{hub_server.url}/{repo_id}.git/info/lfs/objects/batch", body, auth)
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())["objects"][0]

    actions = batch()["actions"]
    href = urlsplit(actions["upload"]["href"])
    conn = http.client.HTTPConnection(href.netloc)
    conn.request("PUT", f"{href.path}?{href.query}", body=iter([b"\x00wrong" * 10]), encode_chunked=True)
    assert conn.getresponse().status == 400  # sha256/size mismatch
    conn.close()
    conn = http.client.HTTPConnection(href.netloc)
    conn.request("PUT", f"{href.path}?{href.query}", body=iter([data[:500], data[500:]]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    verify = urllib.request.Request(actions["verify"]["href"],
                                    json.dumps({"oid": oid, "size": len(data)}).encode(), auth)
    with urllib.request.urlopen(verify) as resp:
        assert resp.status == 200
    assert "actions" not in batch()  # already stored: the client skips the upload


def test_raw_empty_commit_is_created_like_on_the_hub(hub_server, repo_id):
    before = hub_server.commits(repo_id)
    body = json.dumps({"key": "header", "value": {"summary": "empty", "description": ""}}).encode() + b"\n"
    req = urllib.request.Request(
        f"{hub_server.url}/api/models/{repo_id}/commit/main", body,
        {"Authorization": f"Bearer {hub_server.token}", "Content-Type": "application/x-ndjson"},
    )
    with urllib.request.urlopen(req) as resp:
        oid = json.loads(resp.read())["commitOid"]
    assert hub_server.commits(repo_id) == [oid, *before]


def test_stale_parent_commit_is_rejected(api, repo_id):
    parent = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd("b.txt", b"2")],
            commit_message="late",
            parent_commit=parent,
        )
    assert exc.value.response.status_code == 412


def test_deletions(hub_server, api, repo_id):
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(p, b"x") for p in ("keep.txt", "dir/a.txt", "dir/b/c.txt")],
        commit_message="add",
    )
    api.delete_folder("dir", repo_id=repo_id)
    api.delete_file("keep.txt", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    before = hub_server.commits(repo_id)
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, operations=[CommitOperationDelete("nope.txt")], commit_message="rm")
    assert hub_server.commits(repo_id) == before


def test_upload_folder_twice_makes_no_new_commit(hub_server, api, repo_id, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text('{"rank": 4}')
    (tmp_path / "sub" / "notes.md").write_text("notes")
    for i in range(3):  # several LFS files: the client uploads them from parallel threads
        (tmp_path / f"lora_{i}.safetensors").write_bytes(_weights() + b" " * i)
    first = api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    commits = hub_server.commits(repo_id)
    assert commits[0] == first.oid and len(commits) == 2

    second = api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert hub_server.commits(repo_id) == commits  # the client skipped everything thanks to preupload oids
    assert second.oid == first.oid

    (tmp_path / "config.json").write_text('{"rank": 8}')
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert len(hub_server.commits(repo_id)) == 3


def test_lfs_decision_follows_size_content_and_gitattributes(api, repo_id):
    big = b"a" * (10 * 1024 * 1024 + 1)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("big.txt", big),  # over 10 MB
            CommitOperationAdd("blob.dat", b"\x00\x01binary"),  # binary sample
            CommitOperationAdd("small.json", b"{}"),
        ],
        commit_message="mixed",
    )
    lfs = {s.rfilename: s.lfs is not None for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert lfs == {".gitattributes": False, "big.txt": True, "blob.dat": True, "small.json": False}
    assert _read(hf_hub_download(repo_id, "big.txt")) == big

    api.upload_file(path_or_fileobj=b"*.md filter=lfs diff=lfs merge=lfs -text\n",
                    path_in_repo=".gitattributes", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"# notes", path_in_repo="notes.md", repo_id=repo_id)
    (notes,) = api.get_paths_info(repo_id, ["notes.md"])
    assert notes.lfs is not None


# ------------------------------------------------------------------------------------- browsing
def test_list_files_and_tree(api, repo_id):
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("README.md", README.encode()),
            CommitOperationAdd("unet/lora.safetensors", _weights()),
            CommitOperationAdd("unet/sub/config.json", b"{}"),
        ],
        commit_message="files",
    )
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes", "README.md", "unet/lora.safetensors", "unet/sub/config.json",
    ]
    top = {e.path: e for e in api.list_repo_tree(repo_id)}
    assert set(top) == {".gitattributes", "README.md", "unet"} and isinstance(top["unet"], RepoFolder)

    below = {e.path: e for e in api.list_repo_tree(repo_id, path_in_repo="unet", expand=True)}
    assert set(below) == {"unet/lora.safetensors", "unet/sub"}
    weights = below["unet/lora.safetensors"]
    assert isinstance(weights, RepoFile) and weights.lfs is not None and weights.xet_hash is None
    assert weights.last_commit.title == "files"

    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="missing"))


def test_get_paths_info(api, repo_id):
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd("a.txt", b"abc"), CommitOperationAdd("w/x.safetensors", _weights())],
        commit_message="files",
    )
    infos = {e.path: e for e in api.get_paths_info(repo_id, ["a.txt", "w", "w/x.safetensors", "missing.txt"])}
    assert set(infos) == {"a.txt", "w", "w/x.safetensors"}
    assert isinstance(infos["w"], RepoFolder)
    assert infos["a.txt"].size == 3 and infos["a.txt"].lfs is None
    assert infos["a.txt"].blob_id == hashlib.sha1(b"blob 3\0abc").hexdigest()  # git blob id
    assert infos["w/x.safetensors"].lfs.sha256 == hashlib.sha256(_weights()).hexdigest()


def test_range_requests(hub_server, api, repo_id):
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)
    url = f"{hub_server.url}/{repo_id}/resolve/main/digits.txt"
    status, headers, body = _get(url, {"Range": "bytes=2-5"})
    assert (status, body, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    status, headers, body = _get(url, {"Range": "bytes=7-"})
    assert (status, body, headers["Content-Range"]) == (206, b"789", "bytes 7-9/10")
    status, _, body = _get(url, {"Range": "bytes=-3"})
    assert (status, body) == (206, b"789")
    assert _get(url, {"Range": "bytes=50-"})[0] == 416


# ------------------------------------------------------------------------------------- errors & auth
def test_error_mapping(hub_server, api, repo_id):
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "x.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")

    status, headers, _ = _get(f"{hub_server.url}/{repo_id}/resolve/main/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == hub_server.commits(repo_id)[0]


def test_auth_is_enforced_and_token_never_logged(hub_server, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    rid = f"tester/t-{uuid.uuid4().hex[:12]}"
    for bad in (HfApi(token="hf_wrong"), HfApi(token=False)):
        with pytest.raises(HfHubHTTPError) as exc:
            bad.create_repo(rid)
        assert exc.value.response.status_code == 401
        assert not isinstance(exc.value, RepositoryNotFoundError)
        assert exc.value.response.json() == {"error": "Invalid credentials in Authorization header"}
    with pytest.raises(HfHubHTTPError):
        HfApi(token="hf_wrong").whoami()
    assert HfApi().whoami()["name"] == "tester"

    # Private repos are invisible without a token; public ones are readable anonymously.
    HfApi().create_repo(rid, private=True)
    HfApi().upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=rid)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(rid)
    assert HfApi().model_info(rid).private is True
    HfApi().update_repo_settings(rid, private=False)
    assert HfApi(token=False).model_info(rid).private is False

    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, repr(hub_server.request_log)):
        assert hub_server.token not in text


# ------------------------------------------------------------------------------------- test helpers
def test_corrupt_serves_flipped_bytes_of_same_size(hub_server, api, repo_id, tmp_path):
    weights = _weights()
    api.upload_file(path_or_fileobj=weights, path_in_repo="lora.safetensors", repo_id=repo_id)
    hub_server.corrupt(repo_id, "lora.safetensors")
    try:
        bad = _read(hf_hub_download(repo_id, "lora.safetensors", cache_dir=tmp_path / "a"))
        assert len(bad) == len(weights) and bad != weights
    finally:
        hub_server.uncorrupt_all()
    good = _read(hf_hub_download(repo_id, "lora.safetensors", cache_dir=tmp_path / "b"))
    assert good == weights


def test_request_log_records_method_and_path(hub_server, api, repo_id):
    api.model_info(repo_id)
    assert ("GET", f"/api/models/{repo_id}") in hub_server.request_log


def test_offline_mode_uses_cache(hub_server, api, repo_id, monkeypatch, tmp_path):
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="a.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"never fetched", path_in_repo="b.txt", repo_id=repo_id)
    path = hf_hub_download(repo_id, "a.txt", cache_dir=tmp_path)

    # huggingface_hub reads HF_HUB_OFFLINE at import; is_offline_mode() returns this attribute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.is_offline_mode()
    seen = len(hub_server.request_log)
    assert hf_hub_download(repo_id, "a.txt", cache_dir=tmp_path) == path
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(repo_id, "b.txt", cache_dir=tmp_path)
    with pytest.raises(OfflineModeIsEnabled):
        api.model_info(repo_id)
    assert len(hub_server.request_log) == seen  # nothing reached the server


def test_standalone_server_without_auth_and_reset(tmp_path):
    """A second server, token=None: no auth needed anywhere; reset() wipes it; helpers raise KeyError."""
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token=False)
        api.create_repo("someone/free")
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="someone/free")
        assert api.whoami(token="any-token-is-fine")["name"] == "tester"
        path = hf_hub_download("someone/free", "x.txt", endpoint=hub.url, token=False, cache_dir=tmp_path)
        assert _read(path) == b"x"
        assert len(hub.commits("someone/free")) == 2
        hub.reset()
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("someone/free")
        with pytest.raises(KeyError):
            hub.commits("someone/free")
        with pytest.raises(KeyError):
            hub.corrupt("someone/free", "x.txt")


def test_set_hub_offline_patches_client_and_diffusers_copies(monkeypatch):
    # Stand-in for e.g. diffusers.loaders.lora_base, which did `from huggingface_hub.constants import HF_HUB_OFFLINE`.
    copy = types.ModuleType("diffusers._copy_for_test")
    copy.HF_HUB_OFFLINE = False
    monkeypatch.setitem(sys.modules, copy.__name__, copy)
    with monkeypatch.context() as mp:
        set_hub_offline(mp)
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and copy.HF_HUB_OFFLINE is True
        with pytest.raises(OfflineModeIsEnabled):
            HfApi().whoami()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and copy.HF_HUB_OFFLINE is False


def test_front_matter_fallback_parser_without_pyyaml():
    """The stdlib-only YAML subset used when PyYAML is missing agrees with PyYAML on card basics."""
    import hub_server

    text = README.split("---")[1] + "widget:\n  text: hi\n  n: 3\ndatasets: [a, 'b']\n"
    expected = {
        "license": "apache-2.0", "library_name": "diffusers", "tags": ["flux", "lora"],
        "base_model": "black-forest-labs/FLUX.1-dev", "widget": {"text": "hi", "n": 3}, "datasets": ["a", "b"],
    }
    assert hub_server._mini_yaml(text) == expected
    assert hub_server.yaml.safe_load(text) == expected
