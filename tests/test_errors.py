"""Bad input is a specific error raised before anything changes."""

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import clear_adapters
from clear_adapters import (AdapterNotFoundError, ClearAdapterError, IncompatibleModelError, IntegrityError,
                            UnsafeFormatError)
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(0)


@pytest.fixture(scope="module")
def good(tmp_path_factory, pipe):
    return write_reference_checkpoint(tmp_path_factory.mktemp("good") / "r3.safetensors", pipe.transformer, 3)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(pipe, before):
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in pipe.transformer.attn_processors.values())
    assert not hasattr(pipe.transformer, "_clear_handle")
    assert not pipe.transformer._forward_pre_hooks


def test_non_flux_pipeline(good):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(IncompatibleModelError, match="has no FLUX transformer"):
        clear_adapters.load(good, ddpm)
    with pytest.raises(IncompatibleModelError, match="no FLUX attention layers"):
        clear_adapters.load(good, unet)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


def test_wrong_shape_checkpoint(tmp_path, pipe, good):
    before = state(pipe.transformer)
    tensors = load_file(str(good))
    tensors["transformer_blocks.1.attn.to_k.weight"] = torch.zeros(16, 32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(IncompatibleModelError, match=r"to_k.weight: adapter tensor has shape \(16, 32\)"):
        clear_adapters.load(tmp_path / "bad.safetensors", pipe, window_size=3)
    assert_unchanged(pipe, before)


def test_missing_layers(tmp_path, pipe, good):
    before = state(pipe.transformer)
    tensors = {k: v for k, v in load_file(str(good)).items() if not k.startswith("single_transformer_blocks.1.")}
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(IncompatibleModelError, match="missing single_transformer_blocks.1.attn.to_q.weight"):
        clear_adapters.load(tmp_path / "partial.safetensors", pipe, window_size=3)
    assert_unchanged(pipe, before)


def test_checkpoint_for_a_bigger_model(tmp_path, pipe, good):
    before = state(pipe.transformer)
    tensors = load_file(str(good))
    tensors["transformer_blocks.7.attn.to_q.weight"] = tensors["transformer_blocks.0.attn.to_q.weight"].clone()
    save_file(tensors, str(tmp_path / "big.safetensors"))
    with pytest.raises(IncompatibleModelError, match="transformer_blocks.7.attn, which transformer does not have"):
        clear_adapters.load(tmp_path / "big.safetensors", pipe, window_size=3)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_paths_are_refused_without_unpickling(tmp_path, pipe, suffix):
    before = state(pipe.transformer)
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafeFormatError, match="never loaded"):
        clear_adapters.load(path, pipe, window_size=3)
    assert not marker.exists()
    # a pickle renamed to .safetensors is caught by its content
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(IntegrityError):
        clear_adapters.load(disguised, pipe, window_size=3)
    assert not marker.exists()
    assert_unchanged(pipe, before)


def test_unknown_registry_name_suggests_closest(pipe):
    before = state(pipe.transformer)
    for name in ["flux-devv", "flux_dev", "flux-dev/r17"]:
        with pytest.raises(AdapterNotFoundError, match="Did you mean.*'flux-dev"):
            clear_adapters.load(name, pipe)
    with pytest.raises(AdapterNotFoundError, match="flux-dev"):
        clear_adapters.load("fluxdev", pipe)
    assert_unchanged(pipe, before)


def test_file_without_window_needs_window_size(tmp_path, pipe, good):
    tensors = load_file(str(good))
    save_file(tensors, str(tmp_path / "nowindow.safetensors"))  # no metadata header
    with pytest.raises(ClearAdapterError, match="pass window_size="):
        clear_adapters.load(tmp_path / "nowindow.safetensors", pipe)
    handle = clear_adapters.load(tmp_path / "nowindow.safetensors", pipe, window_size=3, down_factor=1)
    assert handle.config.window_size == 3
    with pytest.raises(ClearAdapterError, match="already has CLEAR"):
        clear_adapters.load(tmp_path / "nowindow.safetensors", pipe, window_size=3)
    clear_adapters.unload(pipe)
    with pytest.raises(ClearAdapterError, match="no CLEAR adapter installed"):
        clear_adapters.unload(pipe)


def test_down_factor_mismatch(tmp_path, pipe):
    before = state(pipe.transformer)
    ck = write_reference_checkpoint(tmp_path / "d2.safetensors", pipe.transformer, 3, down_factor=2)
    with pytest.raises(IncompatibleModelError, match="down_factor=2"):
        clear_adapters.load(ck, pipe, down_factor=1)
    assert_unchanged(pipe, before)


def test_local_directory_with_one_safetensors(tmp_path, pipe, good):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.safetensors").write_bytes(good.read_bytes())
    handle = clear_adapters.load(tmp_path / "adapter", pipe)
    assert handle.config.window_size == 3
    clear_adapters.unload(pipe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="exactly one .safetensors"):
        clear_adapters.load(tmp_path / "empty", pipe)
