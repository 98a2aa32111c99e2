"""CLEAR with FLUX IP-Adapters: any load/unload order keeps CLEAR active; the IP branch is intact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clear_adapters import api, processors
from clear_adapters.compat import FULL_WINDOW, max_difference
from clear_adapters.testing import tiny_flux_pipeline, tiny_flux_transformer, tiny_image_encoder, tiny_test_image, \
    write_reference_checkpoint, write_tiny_ip_adapter

# the tiny pipelines run fastest on one thread on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5
WEIGHT_NAME = "ip_adapter.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    transformer = tiny_flux_transformer(0)
    return {"adapter": write_reference_checkpoint(root / "clear.safetensors", transformer, 4),
            "ip": write_tiny_ip_adapter(root / "ip" / WEIGHT_NAME, transformer)}


IMAGE = tiny_test_image(64, seed=3)


def load_ip(pipe, files, scale=1.0):
    encoder, processor = tiny_image_encoder()
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    pipe.load_ip_adapter(str(files["ip"].parent), weight_name=WEIGHT_NAME)
    pipe.set_ip_adapter_scale(scale)


def generate(pipe, with_image=True):
    extra = {"ip_adapter_image": IMAGE} if with_image else {}
    return pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0), **extra).images[0]


def calls_per_image(pipe):
    return 2 * len(api.flux_models(pipe)[0][1].attn_processors)  # every layer, every step


def test_the_tiny_ip_adapter_file_has_the_diffusers_flux_layout(files):
    keys = set(load_file(files["ip"]))
    assert {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias"} <= keys
    assert {f"ip_adapter.{i}.{p}.{w}" for i in range(2) for p in ("to_k_ip", "to_v_ip") for w in ("weight", "bias")} \
        <= keys
    assert load_file(files["ip"])["image_proj.proj.weight"].shape == (4 * 32, 32)  # 4 tokens x joint_attention_dim


@pytest.mark.parametrize("order", ["ip-then-clear", "clear-then-ip"])
def test_any_order_keeps_clear_active_and_gives_the_same_image(files, order):
    pipe = tiny_flux_pipeline(0)
    if order == "ip-then-clear":
        load_ip(pipe, files)
        handle = api.load(files["adapter"], pipe)
    else:
        handle = api.load(files["adapter"], pipe)
        load_ip(pipe, files)
    per_image = calls_per_image(pipe)
    image = generate(pipe)
    assert handle.kernel_calls == per_image
    double = [a for n, a in pipe.transformer.attn_processors.items() if n.startswith("transformer_blocks")]
    assert all(isinstance(p, processors.ClearFluxIPAdapterAttnProcessor) for p in double)

    # Unload the IP-Adapter with CLEAR installed: CLEAR keeps running.
    pipe.unload_ip_adapter()
    no_ip = generate(pipe, with_image=False)
    assert handle.kernel_calls == 2 * per_image
    # ... and load it again: CLEAR still runs, same image as before.
    load_ip(pipe, files)
    assert max_difference(generate(pipe), image) <= EXACT
    assert handle.kernel_calls == 3 * per_image
    assert max_difference(image, no_ip) > 1e-4

    reference = tiny_flux_pipeline(0)  # the other order must agree
    api.load(files["adapter"], reference)
    load_ip(reference, files)
    assert max_difference(generate(reference), image) <= EXACT

    api.unload(pipe)  # the IP-Adapter survives CLEAR's unload, as plain diffusers processors
    assert all(type(p).__name__ in ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")
               for p in pipe.transformer.attn_processors.values())
    plain = tiny_flux_pipeline(0)
    load_ip(plain, files)
    assert max_difference(generate(pipe), generate(plain)) <= EXACT


def test_ip_scale_zero_equals_no_ip_adapter(files):
    plain = tiny_flux_pipeline(0)
    no_ip_full = generate(plain, with_image=False)
    api.load(files["adapter"], plain)
    no_ip_clear = generate(plain, with_image=False)

    pipe = tiny_flux_pipeline(0)
    load_ip(pipe, files, scale=0.0)
    assert max_difference(generate(pipe), no_ip_full) <= EXACT
    handle = api.load(files["adapter"], pipe)
    assert max_difference(generate(pipe), no_ip_clear) <= EXACT
    pipe.set_ip_adapter_scale(0.6)  # set after CLEAR converted the processors: still honoured
    partial = generate(pipe)
    pipe.set_ip_adapter_scale(1.0)
    assert max_difference(partial, generate(pipe)) > 1e-4 and max_difference(partial, no_ip_clear) > 1e-4
    assert handle.kernel_calls == 3 * calls_per_image(pipe)


def test_ip_branch_is_intact_under_clear(files):
    """With a window covering the image, CLEAR + IP-Adapter is exactly diffusers' IP-Adapter output."""
    pipe = tiny_flux_pipeline(0)
    load_ip(pipe, files)
    full = generate(pipe)
    api.attach(FULL_WINDOW, pipe)
    assert max_difference(generate(pipe), full) <= EXACT
    state = load_file(files["ip"])
    processor = pipe.transformer.transformer_blocks[1].attn.processor
    assert isinstance(processor, processors.ClearFluxIPAdapterAttnProcessor)
    assert torch.equal(processor.to_k_ip[0].weight, state["ip_adapter.1.to_k_ip.weight"])
    assert torch.equal(processor.to_v_ip[0].bias, state["ip_adapter.1.to_v_ip.bias"])
    api.unload(pipe)
    api.attach(2, pipe)
    assert max_difference(generate(pipe), full) > 1e-4


def test_precomputed_image_embeds_without_an_encoder(files):
    pipe = tiny_flux_pipeline(0)
    load_ip(pipe, files)
    embeds = pipe.prepare_ip_adapter_image_embeds(IMAGE, None, "cpu", 1)
    handle = api.load(files["adapter"], pipe)
    with_encoder = generate(pipe)
    pipe.image_encoder = None  # embeds given: the encoder is not needed
    zeros = [torch.zeros_like(e) for e in embeds]
    image = pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                 output_type="pt", generator=torch.Generator().manual_seed(0), ip_adapter_image_embeds=embeds,
                 negative_ip_adapter_image_embeds=zeros).images[0]
    assert max_difference(image, with_encoder) <= EXACT
    assert handle.kernel_calls == 2 * calls_per_image(pipe)
