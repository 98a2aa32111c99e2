"""Loading like diffusers loaders: raw checkpoints in any Hub repo (``weight_name``, ``subfolder``,
``owner/repo/file.safetensors``, header metadata), ``cache_dir``/``local_files_only``/``force_download``,
``describe``/``info`` with the same forms, and a user agent that names the library."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from safetensors.torch import load_file, save_file

import clear_adapters
from clear_adapters import AdapterNotFoundError, ClearAdapterError, OfflineError
from clear_adapters.cli import main
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint
from clear_adapters.weights import attention_layers

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")]


def upstream_file(path: Path, transformer, window: int, down: int = 1) -> Path:
    """A checkpoint exactly as the authors publish theirs: upstream keys, no metadata header."""
    tensors = load_file(write_reference_checkpoint(path, transformer, window, down))
    save_file(tensors, str(path))
    return path


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: attn.to_q.weight.detach().clone() for name, attn in attention_layers(model)}


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(0)


@pytest.fixture(scope="module")
def raw_repo(tmp_path_factory, pipe):
    """A Hub repo holding raw checkpoints only (no clear_config.json): the authors' layout and a subfolder."""
    root = tmp_path_factory.mktemp("raw")
    upstream_file(root / "clear_local_3.safetensors", pipe.transformer, 3)
    upstream_file(root / "clear_local_3_down_2.safetensors", pipe.transformer, 3, down=2)
    write_reference_checkpoint(root / "variants" / "clear_r5.safetensors", pipe.transformer, 5)  # header: window 5
    write_reference_checkpoint(root / "described" / "clear_r6.safetensors", pipe.transformer, 6)
    repo_id = f"someone/raw-clear-{uuid.uuid4().hex[:8]}"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(root))
    return repo_id, root


def test_raw_checkpoint_with_weight_name_and_window_size(pipe, raw_repo, hub_server):
    repo_id, root = raw_repo
    seen = len(hub_server.header_log)
    handle = clear_adapters.load(repo_id, pipe, weight_name="clear_local_3.safetensors", window_size=3)
    expected = load_file(root / "clear_local_3.safetensors")
    assert handle.config.window_size == 3 and handle.config.down_factor == 1
    assert handle.spec.filename == "clear_local_3.safetensors" and len(handle.spec.revision) == 40  # pinned
    assert all(torch.equal(w, expected[f"{name}.to_q.weight"]) for name, w in weights_of(pipe.transformer).items())
    clear_adapters.unload(pipe)
    agents = [h.get("User-Agent", "") for _, path, h in hub_server.header_log[seen:] if "/resolve/" in path]
    assert agents and all(f"clear-adapters/{clear_adapters.__version__}" in a for a in agents)

    # the pooled variant: the down factor is read off its pooling weights when nobody states it
    handle = clear_adapters.load(f"{repo_id}/clear_local_3_down_2.safetensors", pipe, window_size=3)
    assert handle.config.down_factor == 2
    clear_adapters.unload(pipe)


def test_raw_checkpoint_in_a_subfolder_and_window_from_its_header(pipe, raw_repo):
    repo_id, _ = raw_repo
    for source, options in ((repo_id, {"subfolder": "variants", "weight_name": "clear_r5.safetensors"}),
                            (repo_id, {"subfolder": "variants"}),  # the folder's only file
                            (f"{repo_id}/variants/clear_r5.safetensors", {})):
        handle = clear_adapters.load(source, pipe, **options)
        assert handle.config.window_size == 5 and handle.spec.filename == "variants/clear_r5.safetensors"
        clear_adapters.unload(pipe)


def test_raw_repo_errors_say_what_to_pass(pipe, raw_repo):
    repo_id, _ = raw_repo
    before = weights_of(pipe.transformer)
    with pytest.raises(ClearAdapterError, match=r"2 \.safetensors files \(clear_local_3.safetensors, "
                                                r"clear_local_3_down_2.safetensors\); pass weight_name="):
        clear_adapters.load(repo_id, pipe, window_size=3)
    with pytest.raises(ClearAdapterError, match="does not say which window.*pass window_size="):
        clear_adapters.load(repo_id, pipe, weight_name="clear_local_3.safetensors")
    with pytest.raises(AdapterNotFoundError, match="nope.safetensors not found"):
        clear_adapters.load(repo_id, pipe, weight_name="nope.safetensors", window_size=3)
    with pytest.raises(ValueError, match="weight_name must be a file name"):
        clear_adapters.load(repo_id, pipe, weight_name="variants/clear_r5.safetensors")
    with pytest.raises(ValueError, match="subfolder must be a relative folder"):
        clear_adapters.load(repo_id, pipe, subfolder="../other")
    with pytest.raises(ClearAdapterError, match="registry name and already names its file"):
        clear_adapters.load("flux-dev", pipe, weight_name="x.safetensors")
    assert all(torch.equal(before[k], v) for k, v in weights_of(pipe.transformer).items())
    assert clear_adapters.get_handle(pipe) is None


def test_local_files_only_cache_dir_and_force_download(pipe, raw_repo, tmp_path, hub_server):
    repo_id, _ = raw_repo
    cache = tmp_path / "cache"
    options = {"weight_name": "clear_local_3.safetensors", "window_size": 3, "cache_dir": cache}
    with pytest.raises(OfflineError, match="not in the local Hub cache and local_files_only=True"):
        clear_adapters.load(repo_id, pipe, local_files_only=True, **options)
    assert clear_adapters.get_handle(pipe) is None
    handle = clear_adapters.load(repo_id, pipe, **options)  # downloads into cache_dir
    assert Path(handle.spec.weights_path).is_relative_to(cache)
    clear_adapters.unload(pipe)
    seen = len(hub_server.request_log)
    handle = clear_adapters.load(repo_id, pipe, local_files_only=True, **options)  # cached: no request at all
    assert hub_server.request_log[seen:] == [] and Path(handle.spec.weights_path).is_relative_to(cache)
    clear_adapters.unload(pipe)
    clear_adapters.load(repo_id, pipe, force_download=True, **options)  # fetched again although cached
    assert ("GET", f"/{repo_id}/resolve/main/clear_local_3.safetensors") in \
        hub_server.request_log[seen:]
    clear_adapters.unload(pipe)


def test_describe_and_info_take_the_same_forms_without_downloading(raw_repo, capsys):
    repo_id, _ = raw_repo
    info = clear_adapters.describe(f"{repo_id}/described/clear_r6.safetensors")
    assert info["window_size"] == 6 and info["down_factor"] == 1 and info["weights"] == "described/clear_r6.safetensors"
    assert not isinstance(try_to_load_from_cache(repo_id, "described/clear_r6.safetensors"), str)  # header only
    info = clear_adapters.describe(repo_id, weight_name="clear_local_3_down_2.safetensors")
    assert info["window_size"] is None and "pass window_size=" in info["note"]
    assert main(["info", repo_id, "--subfolder", "variants"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["window_size"] == 5 and printed["repo_id"] == repo_id


def test_local_directory_with_weight_name_and_subfolder(pipe, tmp_path):
    folder = tmp_path / "adapters" / "clear"
    upstream_file(folder / "a.safetensors", pipe.transformer, 3)
    write_reference_checkpoint(folder / "b.safetensors", pipe.transformer, 4)
    with pytest.raises(AdapterNotFoundError, match=r"found 2 \(a.safetensors, b.safetensors\); pass weight_name="):
        clear_adapters.load(tmp_path / "adapters", pipe, subfolder="clear")
    handle = clear_adapters.load(tmp_path / "adapters", pipe, subfolder="clear", weight_name="b.safetensors")
    assert handle.config.window_size == 4 and handle.spec.weights_path == folder / "b.safetensors"
    clear_adapters.unload(pipe)
