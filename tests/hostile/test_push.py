"""Hostile conditions while publishing: secrets in the commit message, uploads that fail."""

from __future__ import annotations

import pytest

import clear_adapters
from clear_adapters import ClearAdapterError, HubServerError

from ._helpers import unique_repo


@pytest.fixture
def fresh_adapter(tmp_path):
    """An adapter whose weights the server has never stored (stored LFS objects are not uploaded again)."""
    import uuid

    from clear_adapters.testing import tiny_flux_transformer, write_reference_checkpoint

    model = tiny_flux_transformer(0)
    checkpoint = write_reference_checkpoint(tmp_path / "c.safetensors", model, 3, seed=uuid.uuid4().int % 10**6)
    handle = clear_adapters.load(checkpoint, model)
    directory = clear_adapters.save_adapter(handle, tmp_path / "adapter", base_model="black-forest-labs/FLUX.1-dev")
    clear_adapters.unload(model)
    return directory

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.mark.parametrize("where", ["message", "token-only"])
def test_token_in_the_commit_message_is_refused_before_any_request(adapter_dir, hub_server, hub_token, where):
    repo = unique_repo("secret")
    message = f"trained with {hub_token} oops" if where == "message" else hub_token
    seen = len(hub_server.request_log)
    with pytest.raises(ClearAdapterError, match="commit message contains a Hub token") as info:
        clear_adapters.push(adapter_dir, repo, commit_message=message)
    assert type(info.value) is ClearAdapterError
    assert hub_token not in str(info.value)
    assert not any(repo in path for _, path in hub_server.request_log[seen:])


def test_failed_lfs_upload_is_a_server_error_naming_the_file(fresh_adapter, hub_server, hub_token, no_backoff):
    repo = unique_repo("upload-fails")
    hub_server.inject_upload_failure(500)
    try:
        with pytest.raises(HubServerError, match=r"clear_adapter.safetensors.*HTTP 500") as info:
            clear_adapters.push(fresh_adapter, repo)
    finally:
        hub_server.clear_faults()
    assert info.value.status == 500 and hub_token not in str(info.value)
    assert clear_adapters.push(fresh_adapter, repo).changed  # fixed server: the same push goes through


def test_failed_lfs_upload_with_a_client_status_is_a_hub_error(fresh_adapter, hub_server, no_backoff):
    repo = unique_repo("upload-refused")
    hub_server.inject_upload_failure(413)
    try:
        with pytest.raises(clear_adapters.HubError, match=r"clear_adapter.safetensors.*HTTP 413") as info:
            clear_adapters.push(fresh_adapter, repo)
    finally:
        hub_server.clear_faults()
    assert type(info.value) is clear_adapters.HubError and info.value.status == 413
