"""CLEAR installed in real diffusers FLUX pipelines (tiny, offline): exactness, weights, unload, resolutions."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import clear_adapters
from clear_adapters.processors import ClearFluxAttnProcessor
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint
from clear_adapters.weights import attention_layers


def generate(pipe, height=64, width=64, seed=0, **kwargs):
    extra = {}
    if "controlnet" in pipe.components:
        extra = dict(control_image=torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(7)),
                     controlnet_conditioning_scale=1.0)
    return pipe("a photo of a cat", height=height, width=width, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **extra, **kwargs).images


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def processor_classes(model):
    return {k: type(v) for k, v in model.attn_processors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pipe = tiny_flux_pipeline(0)
    return write_reference_checkpoint(tmp_path_factory.mktemp("ckpt") / "clear_r3.safetensors", pipe.transformer, 3)


@pytest.mark.parametrize("controlnet,backend", [(False, "auto"), (True, "auto"), (False, "dense"), (False, "flex")])
def test_window_covering_the_image_equals_stock_processor(controlnet, backend):
    pipe = tiny_flux_pipeline(0, controlnet=controlnet)
    stock = generate(pipe)
    handle = clear_adapters.attach(1000, pipe, backend=backend)
    assert handle.targets == (["transformer", "controlnet"] if controlnet else ["transformer"])
    clear = generate(pipe)
    assert handle.kernel_calls > 0
    assert (clear - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("controlnet", [False, True])
def test_loaded_adapter_at_full_window_equals_stock_with_same_weights(checkpoint, controlnet):
    """Same weights, stock attention vs CLEAR attention with r beyond the grid diagonal (d=1)."""
    pipe = tiny_flux_pipeline(0, controlnet=controlnet)
    clear_adapters.load(checkpoint, pipe, window_size=1000)
    clear = generate(pipe)
    models = [pipe.transformer] + ([pipe.controlnet] if controlnet else [])
    with_adapter = [snapshot(m) for m in models]
    clear_adapters.unload(pipe)
    for model, state in zip(models, with_adapter):  # the same weights under diffusers' own processors
        model.load_state_dict(state)
        assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())
    stock = generate(pipe)
    assert (clear - stock).abs().max().item() <= 1e-5


def test_load_writes_file_weights_and_unload_restores_bit_exact(checkpoint):
    from safetensors.torch import load_file

    pipe = tiny_flux_pipeline(0, controlnet=True)
    before_t, before_c = snapshot(pipe.transformer), snapshot(pipe.controlnet)
    classes_t, classes_c = processor_classes(pipe.transformer), processor_classes(pipe.controlnet)
    reference = generate(pipe)

    handle = clear_adapters.load(checkpoint, pipe)
    file = load_file(str(checkpoint))
    state = pipe.transformer.state_dict()
    for key, value in file.items():
        assert torch.equal(state[key], value), key
    assert set(handle.replaced["transformer"]) == set(file)
    assert all(isinstance(p, ClearFluxAttnProcessor) for p in pipe.transformer.attn_processors.values())
    # the ControlNet got the adapter's change relative to the transformer it was made from
    cn_key = "transformer_blocks.0.attn.to_q.weight"
    expected = before_c[cn_key] + (file[cn_key] - before_t[cn_key])
    assert torch.allclose(pipe.controlnet.state_dict()[cn_key], expected, atol=1e-6)
    assert not torch.equal(generate(pipe), reference)

    clear_adapters.unload(pipe)
    for before, model in ((before_t, pipe.transformer), (before_c, pipe.controlnet)):
        after = snapshot(model)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)  # parameters and buffers
    assert processor_classes(pipe.transformer) == classes_t
    assert processor_classes(pipe.controlnet) == classes_c
    assert not hasattr(pipe.transformer, "_clear_handle")
    assert not pipe.transformer._forward_pre_hooks
    assert torch.equal(generate(pipe), reference)
    assert not handle.active


def test_one_pipeline_many_resolutions_without_reinit(checkpoint):
    pipe = tiny_flux_pipeline(0)
    full = {hw: generate(pipe, *hw) for hw in [(64, 64), (128, 128), (128, 96)]}
    handle = clear_adapters.load(checkpoint, pipe)
    clear_adapters.unload(pipe)
    # small r at the adapter's own weights vs the same weights at full window isolates the pattern
    handle = clear_adapters.load(checkpoint, pipe, window_size=2)
    calls = 0
    for (h, w), reference in full.items():
        out = generate(pipe, h, w)
        assert out.shape == (1, 3, h, w)
        assert handle.kernel_calls > calls
        calls = handle.kernel_calls
        assert (out - reference).abs().max() > 1e-3
    # the geometry cache saw three distinct grids: 16x16, 32x32 and 32x24 tokens
    grids = {g.describe() for g in handle._installs[0].context.geometries.values()}
    assert {"text 512 + image 16x16", "text 512 + image 32x32", "text 512 + image 32x24"} <= grids


def test_small_window_differs_from_full_attention():
    pipe = tiny_flux_pipeline(0)
    full = generate(pipe, 128, 128)
    clear_adapters.attach(2, pipe)
    assert (generate(pipe, 128, 128) - full).abs().max() > 1e-3


def test_two_pipelines_with_different_adapters_do_not_interfere(tmp_path):
    a, b = tiny_flux_pipeline(0), tiny_flux_pipeline(0)
    ref_a = generate(a)
    ck = write_reference_checkpoint(tmp_path / "r2.safetensors", b.transformer, 2, seed=3)
    handle_a = clear_adapters.attach(1000, a)
    handle_b = clear_adapters.load(ck, b)
    out_b = generate(b)
    out_a = generate(a)
    assert (out_a - ref_a).abs().max() <= 1e-5
    assert handle_a.config.window_size == 1000 and handle_b.config.window_size == 2
    assert not torch.equal(out_a, out_b)
    clear_adapters.unload(a)
    assert torch.equal(generate(b), out_b)


def test_down_factor_adapter_runs_and_roundtrips(tmp_path):
    pipe = tiny_flux_pipeline(0)
    reference = generate(pipe)
    before = snapshot(pipe.transformer)
    ck = write_reference_checkpoint(tmp_path / "r2d2.safetensors", pipe.transformer, 2, down_factor=2)
    handle = clear_adapters.load(ck, pipe)
    assert handle.config.down_factor == 2
    _, attn = attention_layers(pipe.transformer)[0]
    assert attn._clear_state.spatial_weight.shape == (1, 1, 1, 2, 1, 2, 1)
    out = generate(pipe)
    assert out.isfinite().all() and not torch.equal(out, reference)
    clear_adapters.unload(pipe)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(pipe.transformer).items())


def test_handle_reports_flops():
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.attach(4, pipe)
    flops = handle.attention_flops(256, 256, text_len=512)
    assert flops["image_tokens"] == 64 * 64 and flops["layers"] == 4
    assert 0 < flops["fraction"] < 0.25
    assert flops["clear_total"] == flops["clear_per_layer"] * 4


def test_stock_processors_put_back_by_a_plugin_turn_into_clear_again():
    """A plugin that puts stock processors back (as unload_ip_adapter does) does not remove CLEAR."""
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.attach(2, pipe)
    out = generate(pipe)
    pipe.transformer.set_attn_processor(FluxAttnProcessor())
    calls = handle.kernel_calls
    assert torch.equal(generate(pipe), out)
    assert handle.kernel_calls > calls
