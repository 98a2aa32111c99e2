"""CLEAR with FLUX ControlNets: single, multi and union; CLEAR inside the ControlNet or not."""

from __future__ import annotations

import pytest
import torch

from clear_adapters import api, processors
from clear_adapters.compat import FULL_WINDOW, max_difference
from clear_adapters.integrations.controlnet import CANNY_MODE, canny, union_controlnet
from clear_adapters.testing import randomize_controlnet_outputs, tiny_flux_pipeline, tiny_flux_transformer, \
    tiny_test_image, write_reference_checkpoint
from clear_adapters.weights import attention_layers, read_adapter_file

# the tiny pipelines run fastest on one thread on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5
CONTROL = canny(tiny_test_image(64))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("cn") / "clear.safetensors", tiny_flux_transformer(0), 4)


def generate(pipe, **kwargs):
    kwargs.setdefault("control_image", CONTROL)
    return pipe(prompt="a photo of a house", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images[0]


def test_canny_control_image_from_a_drawn_image():
    assert CONTROL.size == (64, 64)
    import numpy as np

    values = torch.from_numpy(np.asarray(CONTROL.convert("L")).astype(np.int64))
    assert set(values.unique().tolist()) <= {0, 255} and 0.02 < (values > 0).float().mean() < 0.4


def test_clear_runs_inside_the_controlnet_with_its_delta(adapter):
    pipe = tiny_flux_pipeline(0, controlnet=True)
    full = generate(pipe)
    assert max_difference(full, generate(pipe, controlnet_conditioning_scale=0.0)) > 1e-4  # the ControlNet acts
    net_before = {n: a.to_q.weight.detach().clone() for n, a in attention_layers(pipe.controlnet)}
    transformer_before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    handle = api.load(adapter, pipe)
    assert handle.targets == ["transformer", "controlnet"]
    clear = generate(pipe)
    layers = len(attention_layers(pipe.transformer)) + len(attention_layers(pipe.controlnet))
    assert handle.kernel_calls == 2 * layers
    assert all(processors.is_clear(a.processor) for _, a in attention_layers(pipe.controlnet))
    # W_controlnet + (W_clear - W_transformer): here the ControlNet was copied from the transformer.
    state, _ = read_adapter_file(adapter)
    key = "transformer_blocks.0.attn.to_q.weight"
    expected = net_before["transformer_blocks.0.attn"] + (state[key] - transformer_before)
    assert torch.allclose(pipe.controlnet.transformer_blocks[0].attn.to_q.weight, expected, atol=1e-6)
    api.unload(pipe)
    assert max_difference(generate(pipe), full) == 0.0

    handle = api.load(adapter, pipe, controlnet=False)  # ControlNet left dense
    assert handle.targets == ["transformer"]
    dense_net = generate(pipe)
    assert handle.kernel_calls == 2 * len(attention_layers(pipe.transformer))
    assert not any(processors.is_clear(a.processor) for _, a in attention_layers(pipe.controlnet))
    assert max_difference(dense_net, clear) > 1e-4
    api.unload(pipe)


@pytest.mark.parametrize("kind", ["single", "multi", "union"])
def test_exact_at_full_window_and_differs_at_small_window(kind):
    if kind == "union":
        transformer = tiny_flux_transformer(0)
        pipe = tiny_flux_pipeline(0, controlnet=True)
        torch.manual_seed(3)
        net = randomize_controlnet_outputs(union_controlnet(transformer, num_mode=3, num_layers=1,
                                                            num_single_layers=1), seed=3)
        pipe.register_modules(controlnet=net)
        kwargs = {"control_mode": CANNY_MODE}
    else:
        pipe = tiny_flux_pipeline(0, controlnet=2 if kind == "multi" else True)
        kwargs = {"control_image": [CONTROL, CONTROL.transpose(0)], "controlnet_conditioning_scale": [0.6, 0.5]} \
            if kind == "multi" else {}
    full = generate(pipe, **kwargs)
    handle = api.attach(FULL_WINDOW, pipe)
    assert max_difference(generate(pipe, **kwargs), full) <= EXACT
    assert handle.kernel_calls > 0
    if kind == "multi":
        assert handle.targets == ["transformer", "controlnet.nets.0", "controlnet.nets.1"]
    api.unload(pipe)
    api.attach(3, pipe)
    assert max_difference(generate(pipe, **kwargs), full) > 1e-4
    api.unload(pipe)
    assert max_difference(generate(pipe, **kwargs), full) == 0.0


def test_union_controlnet_keeps_num_mode_and_sees_one_more_text_token(adapter):
    transformer = tiny_flux_transformer(0)
    net = union_controlnet(transformer, num_mode=3, num_layers=1, num_single_layers=1)
    assert net.union and net.controlnet_mode_embedder.num_embeddings == 3
    assert torch.equal(net.transformer_blocks[0].attn.to_q.weight, transformer.transformer_blocks[0].attn.to_q.weight)
    randomize_controlnet_outputs(net, seed=4)
    pipe = tiny_flux_pipeline(0, controlnet=True)
    pipe.register_modules(controlnet=net)
    handle = api.load(adapter, pipe)
    text_lengths = {}

    def record(name):
        def hook(module, args, kwargs):
            text_lengths.setdefault(name, set()).add(kwargs["encoder_hidden_states"].shape[1])
        return hook

    hooks = [model.transformer_blocks[0].attn.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, model in [("transformer", pipe.transformer), ("controlnet", net)]]
    mode0 = generate(pipe, control_mode=CANNY_MODE)
    mode2 = generate(pipe, control_mode=2)
    for hook in hooks:
        hook.remove()
    assert max_difference(mode0, mode2) > 1e-4
    assert text_lengths == {"transformer": {32}, "controlnet": {33}}  # the mode token
    assert handle.targets == ["transformer", "controlnet"]
    assert handle.kernel_calls == 2 * 2 * (len(attention_layers(pipe.transformer)) + len(attention_layers(net)))
