"""Regressions from review: atomic installs, fused QKV, bf16 ids, masks, leaks, copies, ControlNets with LoRA."""

import copy
import gc
import weakref

import pytest
import torch

import clear_adapters
from clear_adapters import ClearAdapterError, ClearConfig, Geometry, clear_attention
from clear_adapters import weights as weights_module
from clear_adapters.testing import (tiny_flux_pipeline, write_reference_checkpoint, write_tiny_ip_adapter,
                                    write_tiny_lora)


def generate(pipe, size=64):
    return pipe("a photo of a cat", height=size, width=size, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("rob") / "r4.safetensors",
                                      tiny_flux_pipeline(0).transformer, 4, scale=0.5)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failure_half_way_through_writing_leaves_nothing_written(checkpoint, monkeypatch):
    pipe = tiny_flux_pipeline(0)
    before = _state(pipe.transformer)
    real, calls = weights_module._fingerprint, []

    def failing(t):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("simulated")
        return real(t)

    monkeypatch.setattr(weights_module, "_fingerprint", failing)
    with pytest.raises(torch.OutOfMemoryError):
        clear_adapters.load(checkpoint, pipe)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(pipe.transformer, "_clear_handle")


def test_fused_qkv_is_refused_before_any_change(checkpoint):
    pipe = tiny_flux_pipeline(0)
    pipe.transformer.fuse_qkv_projections()
    before = _state(pipe.transformer)
    with pytest.raises(ClearAdapterError, match="unfuse_qkv_projections"):
        clear_adapters.load(checkpoint, pipe)
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in before.items())


def test_fusing_qkv_after_load_is_rebuilt_on_unload(checkpoint):
    pipe = tiny_flux_pipeline(0)
    reference = generate(pipe)
    clear_adapters.load(checkpoint, pipe)
    pipe.transformer.fuse_qkv_projections()
    clear_adapters.unload(pipe)
    attn = pipe.transformer.transformer_blocks[0].attn
    assert torch.equal(attn.to_qkv.weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert (generate(pipe) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("height,width", [(16, 300), (258, 4), (64, 64)])
def test_bf16_ids_recover_the_exact_grid(height, width):
    """Pipelines build img_ids in the model dtype; bf16 rounds integers above 256."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    geometry = Geometry.from_ids(ids.reshape(-1, 3).to(torch.bfloat16), 5)
    assert geometry.grids is not None and (geometry.grids[0].height, geometry.grids[0].width) == (height, width)
    exact = Geometry.from_grid(height, width, 5)
    assert torch.equal(geometry.rows, exact.rows) and torch.equal(geometry.cols, exact.cols)


def test_two_dimensional_masks_follow_diffusers_reading():
    geometry = Geometry.from_grid(4, 4, 4)
    n = geometry.total_len
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    config = ClearConfig(2)
    square = torch.ones(n, n, dtype=torch.bool)
    square[:, 1] = False  # (Nq, Nk): key 1 masked for every query
    padding = torch.ones(1, n, dtype=torch.bool)
    padding[0, 1] = False  # (B, Nk): the same, as key padding
    ref = clear_attention(q, k, v, geometry, config, backend="dense", attention_mask=square[None, None])
    for mask in (square, padding):
        for backend in ("dense", "tiled"):
            out = clear_attention(q, k, v, geometry, config, backend=backend, attention_mask=mask)
            assert (out - ref).abs().max() <= 1e-5


def test_chunked_dense_equals_unchunked():
    from clear_adapters.kernels.dense import dense_attention

    geometry = Geometry.from_grid(6, 5, 3)
    config = ClearConfig(2, 1)
    q, k, v = (torch.randn(2, 2, geometry.total_len, 8) for _ in range(3))
    whole = dense_attention(q, k, v, geometry, config, scale=0.3)
    chunked, lse = dense_attention(q, k, v, geometry, config, scale=0.3, chunk_size=7, return_lse=True)
    assert torch.allclose(whole, chunked, atol=1e-6) and lse.shape == (2, 2, geometry.total_len)


def test_unloaded_handle_does_not_keep_the_model_alive(checkpoint):
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.load(checkpoint, pipe)
    generate(pipe)
    calls = handle.kernel_calls
    ref = weakref.ref(pipe.transformer)
    clear_adapters.unload(pipe)
    del pipe
    gc.collect()
    assert ref() is None
    assert handle.kernel_calls == calls and not handle.active


def test_deep_copy_of_an_installed_model_runs_on_its_own_geometry(checkpoint):
    pipe = tiny_flux_pipeline(0)
    clear_adapters.load(checkpoint, pipe)
    generate(pipe, 64)
    original = pipe.transformer
    pipe.transformer = copy.deepcopy(original)
    out_copy = generate(pipe, 96)
    pipe.transformer = original
    assert torch.equal(generate(pipe, 96), out_copy)


def test_ip_adapter_scale_set_while_clear_is_installed_survives_unload(tmp_path, checkpoint):
    pipe = tiny_flux_pipeline(0)
    write_tiny_ip_adapter(tmp_path / "ip" / "ip.safetensors", pipe.transformer)
    pipe.load_ip_adapter(str(tmp_path / "ip"), weight_name="ip.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)
    clear_adapters.load(checkpoint, pipe)
    pipe.set_ip_adapter_scale(0.3)
    clear_adapters.unload(pipe)
    processor = pipe.transformer.transformer_blocks[0].attn.processor
    assert type(processor).__name__ == "FluxIPAdapterAttnProcessor" and processor.scale == [0.3]


def test_controlnet_delta_ignores_a_lora_fused_into_the_transformer(tmp_path, checkpoint):
    plain = tiny_flux_pipeline(0, controlnet=True)
    clear_adapters.load(checkpoint, plain)
    expected = plain.controlnet.transformer_blocks[0].attn.to_q.weight.detach().clone()
    pipe = tiny_flux_pipeline(0, controlnet=True)
    write_tiny_lora(tmp_path / "lora", pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora()
    clear_adapters.load(checkpoint, pipe)
    assert torch.allclose(pipe.controlnet.transformer_blocks[0].attn.to_q.weight, expected, atol=1e-6)


def test_compiled_transformer_is_unwrapped(checkpoint):
    pipe = tiny_flux_pipeline(0)
    compiled = torch.compile(pipe.transformer)
    handle = clear_adapters.load(checkpoint, compiled)
    assert handle.targets == ["transformer"] and hasattr(pipe.transformer, "_clear_handle")
    clear_adapters.unload(compiled)
    assert not hasattr(pipe.transformer, "_clear_handle")


def test_missing_local_paths_are_not_sent_to_the_hub():
    from clear_adapters import AdapterNotFoundError

    for path in ["adapters/x.safetensors", "./nothing", "/no/such/dir", "a/b/c"]:
        with pytest.raises(AdapterNotFoundError, match="no such file or directory"):
            clear_adapters.resolve(path)
