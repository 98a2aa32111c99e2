"""The adapter artifact (clear_config.json + safetensors + card) and loading it from the Hub.

Everything Hub-side runs through the real ``huggingface_hub`` client against the local server of
``tests/hub_server.py`` (see conftest.py); every test works in its own repository.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

import clear_adapters
from clear_adapters import (AdapterNotFoundError, ClearAdapterError, HubAuthError, IncompatibleModelError,
                            IntegrityError, OfflineError)
from clear_adapters.artifact import CONFIG_NAME, check_adapter_dir, read_config, validate_config
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint
from clear_adapters.weights import read_adapter_file

from hub_server import set_hub_offline  # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BASE = "black-forest-labs/FLUX.1-dev"
WEIGHTS = "clear_adapter.safetensors"


def generate(pipe) -> torch.Tensor:
    return pipe("a photo of a cat", height=64, width=64, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def unique_repo(stem: str) -> str:
    return f"tester/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A reference checkpoint (window 3), the adapter directory saved from it, and the output it gives."""
    root = tmp_path_factory.mktemp("artifact")
    pipe = tiny_flux_pipeline(seed=0)
    checkpoint = write_reference_checkpoint(root / "ref" / "clear_r3.safetensors", pipe.transformer, window_size=3)
    handle = clear_adapters.load(checkpoint, pipe, window_size=3)
    expected = generate(pipe)
    directory = clear_adapters.save_adapter(handle, root / "adapter", base_model=BASE, trained_resolution=64)
    clear_adapters.unload(pipe)
    return {"checkpoint": checkpoint, "dir": directory, "image": expected, "root": root}


@pytest.fixture(scope="module")
def pushed(saved):
    """The saved adapter, pushed once to a fresh repo (shared by the read-only Hub tests)."""
    repo = unique_repo("clear-tiny")
    clear_adapters.push(saved["dir"], repo)
    return repo


# ---------------------------------------------------------------------------------------------- format
def test_save_adapter_writes_a_complete_validated_directory(saved):
    directory = saved["dir"]
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS, "README.md"])
    config, weights_path = check_adapter_dir(directory)
    assert config["format"] == "clear-adapter" and config["format_version"] == 1
    assert (config["architecture"], config["window_size"], config["down_factor"]) == ("flux", 3, 1)
    assert config["base_model"] == BASE and config["weight_mode"] == "replace" and config["trained_resolution"] == 64
    assert config["layers"] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert config["provenance"]["source"] == "clear_r3.safetensors"  # a file name, never a local path
    tensors, header = read_adapter_file(weights_path)
    assert header["window_size"] == "3" and header["clear_format"] == "clear-adapter" and header["base_model"] == BASE
    # the upstream key layout, tensor for tensor the checkpoint it was loaded from
    reference, _ = read_adapter_file(saved["checkpoint"])
    assert tensors.keys() == reference.keys()
    assert not any(k.startswith("single_") and ".to_out" in k for k in tensors)  # single blocks have none
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)
    card = (directory / "README.md").read_text()
    assert card.startswith("---\n") and f"base_model: {BASE}" in card


def test_saved_directory_loads_to_identical_outputs_and_saving_is_deterministic(saved, tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    handle = clear_adapters.load(saved["dir"], pipe)
    assert handle.config.window_size == 3 and handle.spec.base_model == BASE
    assert torch.equal(generate(pipe), saved["image"])
    again = clear_adapters.save_adapter(handle, tmp_path / "again")
    for name in (CONFIG_NAME, WEIGHTS):  # same model, same bytes: re-pushing it is a no-op
        if name == CONFIG_NAME:
            old, new = json.loads((saved["dir"] / name).read_text()), json.loads((again / name).read_text())
            assert old["sha256"] == new["sha256"]
        else:
            assert (saved["dir"] / name).read_bytes() == (again / name).read_bytes()
    with pytest.raises(ClearAdapterError, match="overwrite=True"):
        clear_adapters.save_adapter(handle, again)
    clear_adapters.unload(pipe)


def test_save_adapter_keeps_pooling_weights(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    checkpoint = write_reference_checkpoint(tmp_path / "d2.safetensors", pipe.transformer, window_size=3, down_factor=2)
    handle = clear_adapters.load(checkpoint, pipe)
    directory = clear_adapters.save_adapter(handle, tmp_path / "adapter")
    config, weights_path = check_adapter_dir(directory)
    assert config["down_factor"] == 2 and config["base_model"] is None
    tensors, _ = read_adapter_file(weights_path)
    reference, _ = read_adapter_file(checkpoint)
    assert tensors.keys() == reference.keys()
    key = "single_transformer_blocks.1.attn.processor.spatial_weight"
    assert tensors[key].shape == (1, 1, 1, 2, 1, 2, 1) and torch.equal(tensors[key], reference[key])


def test_save_adapter_reads_peft_base_layers_and_refuses_fused_loras(tmp_path):
    from peft import LoraConfig

    pipe = tiny_flux_pipeline(seed=0)
    reference = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"],
                                            init_lora_weights=False))
    directory = clear_adapters.save_adapter(pipe, tmp_path / "plain", window_size=5)  # unfused LoRA: left out
    tensors, _ = read_adapter_file(directory / WEIGHTS)
    assert torch.equal(tensors["transformer_blocks.0.attn.to_q.weight"],
                       reference["transformer_blocks.0.attn.to_q.weight"])
    assert read_config(directory / CONFIG_NAME)["window_size"] == 5
    pipe.transformer.transformer_blocks[0].attn.to_q.merge()
    with pytest.raises(ClearAdapterError, match="fused.*unfuse"):
        clear_adapters.save_adapter(pipe, tmp_path / "fused", window_size=5)
    with pytest.raises(ClearAdapterError, match="window_size="):
        clear_adapters.save_adapter(tiny_flux_pipeline(seed=0), tmp_path / "nowindow")


def test_config_schema_is_validated_and_newer_versions_are_refused(saved, tmp_path):
    config = read_config(saved["dir"] / CONFIG_NAME)
    with pytest.raises(ClearAdapterError, match="newer.*upgrade clear-adapters"):
        validate_config({**config, "format_version": 2})
    with pytest.raises(IncompatibleModelError, match="architecture 'sd3'"):
        validate_config({**config, "architecture": "sd3"})
    for bad, match in (({"sha256": "xyz"}, "sha256"), ({"window_size": 0}, "window_size"),
                       ({"weights": "../w.safetensors"}, "weights"), ({"layers": ["blocks.0"]}, "layers"),
                       ({"trained_resolution": "1K"}, "trained_resolution"), ({"down_factor": 1.5}, "down_factor")):
        with pytest.raises(IntegrityError, match=match):
            validate_config({**config, **bad})
    # the directory check ties config, weights and sha256 together
    broken = tmp_path / "broken"
    shutil.copytree(saved["dir"], broken)
    (broken / CONFIG_NAME).write_text(json.dumps({**config, "layers": config["layers"][:-1]}))
    with pytest.raises(IntegrityError, match="do not match the layers"):
        check_adapter_dir(broken)
    (broken / CONFIG_NAME).write_text(json.dumps(config))
    data = bytearray((broken / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (broken / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        check_adapter_dir(broken)
    pipe = tiny_flux_pipeline(seed=0)
    before = state(pipe.transformer)
    with pytest.raises(IntegrityError, match="sha256"):  # load refuses a local file that changed after saving
        clear_adapters.load(broken, pipe)
    assert_same_state(before, pipe.transformer)


# ---------------------------------------------------------------------------------------------- Hub loading
def test_load_by_repo_id_pins_the_commit_and_matches_the_local_directory(saved, pushed, hub_server):
    spec = clear_adapters.resolve(pushed, download=False)
    assert spec.revision == hub_server.commits(pushed)[0]  # branch resolved once, weights fetched at that sha
    pipe = tiny_flux_pipeline(seed=0)
    handle = clear_adapters.load(pushed, pipe)
    assert handle.spec.revision == spec.revision and handle.spec.weights_path.parent.name == spec.revision
    assert torch.equal(generate(pipe), saved["image"])
    info = clear_adapters.describe(pushed)
    assert (info["window_size"], info["base_model"], info["revision"]) == (3, BASE, spec.revision)


def test_hub_errors_are_specific(pushed, hub_server):
    pipe = tiny_flux_pipeline(seed=0)
    with pytest.raises(AdapterNotFoundError, match="repository tester/nope-0 not found"):
        clear_adapters.load("tester/nope-0", pipe)
    with pytest.raises(AdapterNotFoundError, match="revision 'no-such-branch' not found"):
        clear_adapters.load(pushed, pipe, revision="no-such-branch")
    # a repo without clear_config.json: not an adapter repo
    from huggingface_hub import HfApi

    other = unique_repo("not-an-adapter")
    HfApi().create_repo(other)
    with pytest.raises(AdapterNotFoundError, match="neither clear_config.json nor a .safetensors file.*clear-adapters push"):
        clear_adapters.load(other, pipe)
    # config present, weights missing
    HfApi().upload_file(path_or_fileobj=json.dumps({"format": "clear-adapter", "format_version": 1, "window_size": 3,
                                                    "weights": WEIGHTS}).encode(),
                        path_in_repo=CONFIG_NAME, repo_id=other)
    with pytest.raises(AdapterNotFoundError, match=f"{WEIGHTS} not found"):
        clear_adapters.load(other, pipe)
    bad_token = "hf_wrongTOKEN_0123456789"
    with pytest.raises(HubAuthError, match="token") as info:  # (uncached: a cached file would be used as is)
        clear_adapters.load(unique_repo("auth"), pipe, token=bad_token)
    assert bad_token not in str(info.value) and hub_server.token not in str(info.value)
    assert getattr(pipe.transformer, "_clear_handle", None) is None


def test_corrupt_download_raises_integrity_error_leaves_model_and_cache_clean(saved, hub_server):
    import huggingface_hub.constants

    repo = unique_repo("corrupt")
    clear_adapters.push(saved["dir"], repo)
    hub_server.corrupt(repo, WEIGHTS)
    pipe = tiny_flux_pipeline(seed=0)
    before = state(pipe.transformer)
    processors = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    try:
        with pytest.raises(IntegrityError, match="sha256.*removed from the Hub cache"):
            clear_adapters.load(repo, pipe)
        assert_same_state(before, pipe.transformer)
        assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == processors
        assert getattr(pipe.transformer, "_clear_handle", None) is None
        cache = huggingface_hub.constants.HF_HUB_CACHE
        cached = list(Path(cache).glob(f"models--{repo.replace('/', '--')}/**/*"))
        weights_sha = read_config(saved["dir"] / CONFIG_NAME)["sha256"]
        assert not any(p.name == WEIGHTS or p.name == weights_sha for p in cached), "the bad copy stayed cached"
        # the config (small, no sha256 of its own) is checked against the hash the Hub serves it under
        second = unique_repo("corrupt-config")
        clear_adapters.push(saved["dir"], second)
        hub_server.corrupt(second, CONFIG_NAME)
        with pytest.raises(IntegrityError, match="clear_config.json.*corrupt"):
            clear_adapters.load(second, pipe)
        assert_same_state(before, pipe.transformer)
    finally:
        hub_server.uncorrupt_all()
    clear_adapters.load(repo, pipe)  # fixed on the server: downloaded afresh, verified, installed
    assert torch.equal(generate(pipe), saved["image"])


def test_offline_uncached_is_a_clear_error_and_cached_loads_offline(saved, monkeypatch):
    repo = unique_repo("offline")
    clear_adapters.push(saved["dir"], repo)
    pipe = tiny_flux_pipeline(seed=0)
    before = state(pipe.transformer)
    set_hub_offline(monkeypatch, True)
    with pytest.raises(OfflineError, match="not in the local Hub cache and offline mode is on.*HF_HUB_OFFLINE"):
        clear_adapters.load(repo, pipe)
    assert_same_state(before, pipe.transformer)
    set_hub_offline(monkeypatch, False)
    handle = clear_adapters.load(repo, pipe)  # online: fills the cache
    commit = handle.spec.revision
    clear_adapters.unload(pipe)
    set_hub_offline(monkeypatch, True)
    handle = clear_adapters.load(repo, pipe)  # offline, branch name: resolved from the cached ref
    assert handle.spec.revision == commit
    assert torch.equal(generate(pipe), saved["image"])
    clear_adapters.unload(pipe)
    clear_adapters.load(repo, pipe, revision=commit)  # offline, pinned commit
    clear_adapters.unload(pipe)
