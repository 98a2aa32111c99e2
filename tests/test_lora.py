"""CLEAR with peft LoRAs: order independence, fuse/unfuse, two adapters, unloading either one."""

from __future__ import annotations

import pytest
import torch

from clear_adapters import api
from clear_adapters.compat import max_difference
from clear_adapters.integrations.lora import load_loras, split_lora_source
from clear_adapters.testing import tiny_flux_pipeline, tiny_flux_transformer, write_reference_checkpoint, \
    write_tiny_lora

# the tiny pipelines run fastest on one thread on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    transformer = tiny_flux_transformer(0)
    return {"adapter": write_reference_checkpoint(root / "clear.safetensors", transformer, 4),
            "a": write_tiny_lora(root / "a", transformer, seed=1),
            "b": write_tiny_lora(root / "b", transformer, seed=2)}


def generate(pipe):
    return pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images[0]


def test_clear_then_lora_equals_lora_then_clear(files):
    first = tiny_flux_pipeline(0)
    load_loras(first, [(str(files["a"]), None)])
    handle = api.load(files["adapter"], first)
    lora_then_clear = generate(first)
    assert handle.kernel_calls > 0

    second = tiny_flux_pipeline(0)
    handle = api.load(files["adapter"], second)
    load_loras(second, [(str(files["a"]), None)])
    clear_then_lora = generate(second)
    assert handle.kernel_calls > 0
    assert max_difference(lora_then_clear, clear_then_lora) <= EXACT

    plain = tiny_flux_pipeline(0)
    api.load(files["adapter"], plain)
    assert max_difference(generate(plain), clear_then_lora) > 1e-4  # the LoRA matters under CLEAR


def test_unloading_either_leaves_the_other_working(files):
    reference = tiny_flux_pipeline(0)
    load_loras(reference, [(str(files["a"]), None)])
    lora_only = generate(reference)
    reference_clear = tiny_flux_pipeline(0)
    api.load(files["adapter"], reference_clear)
    clear_only = generate(reference_clear)

    pipe = tiny_flux_pipeline(0)
    load_loras(pipe, [(str(files["a"]), None)])
    handle = api.load(files["adapter"], pipe)
    both = generate(pipe)
    assert max_difference(both, lora_only) > 1e-4 and max_difference(both, clear_only) > 1e-4
    pipe.unload_lora_weights()
    calls = handle.kernel_calls
    assert max_difference(generate(pipe), clear_only) <= EXACT
    assert handle.kernel_calls > calls  # CLEAR still active

    pipe = tiny_flux_pipeline(0)
    handle = api.load(files["adapter"], pipe)
    load_loras(pipe, [(str(files["a"]), None)])
    api.unload(pipe)
    assert max_difference(generate(pipe), lora_only) <= EXACT  # the LoRA, on the original weights


def test_fuse_unfuse_round_trip_with_clear(files):
    pipe = tiny_flux_pipeline(0)
    load_loras(pipe, [(str(files["a"]), None)])
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "base_layer" in k}
    unfused_full = generate(pipe)
    pipe.fuse_lora()
    handle = api.load(files["adapter"], pipe)  # CLEAR after the fuse keeps the fused delta
    fused_clear = generate(pipe)
    pipe.unfuse_lora()
    unfused_clear = generate(pipe)
    assert max_difference(fused_clear, unfused_clear) <= 1e-4  # same model, merged or not
    pipe.fuse_lora()
    assert max_difference(generate(pipe), fused_clear) <= EXACT
    assert handle.kernel_calls > 0
    api.unload(pipe)  # the LoRA stays fused on the original weights
    assert max_difference(generate(pipe), unfused_full) <= 1e-4
    pipe.unfuse_lora()
    restored = {k: v for k, v in pipe.transformer.state_dict().items() if "base_layer" in k}
    worst = max(float((restored[k] - original[k]).abs().max()) for k in original)
    assert worst <= 1e-6, worst
    assert max_difference(generate(pipe), unfused_full) <= EXACT


def test_two_adapters_with_set_adapters(files):
    pipe = tiny_flux_pipeline(0)
    names = load_loras(pipe, [(str(files["a"]), None), (str(files["b"]), None)], weights=[1.0, 0.7])
    assert names == ["lora_a", "lora_b"]
    full_both = generate(pipe)
    handle = api.load(files["adapter"], pipe)
    both = generate(pipe)
    pipe.set_adapters(["lora_a"])
    only_a = generate(pipe)
    pipe.set_adapters(names, [1.0, 0.7])
    assert max_difference(generate(pipe), both) <= EXACT
    assert max_difference(both, only_a) > 1e-4
    assert handle.kernel_calls > 0
    api.unload(pipe)
    assert max_difference(generate(pipe), full_both) <= EXACT


def test_lora_scale_through_joint_attention_kwargs(files):
    pipe = tiny_flux_pipeline(0)
    load_loras(pipe, [(str(files["a"]), None)])
    api.load(files["adapter"], pipe)
    kwargs = dict(prompt="a photo", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                  output_type="pt")
    full_scale = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    zero = pipe(**kwargs, joint_attention_kwargs={"scale": 0.0}, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.disable_lora()
    disabled = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    assert max_difference(zero, disabled) <= EXACT and max_difference(zero, full_scale) > 1e-4


def test_split_lora_source(tmp_path):
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"x")
    assert split_lora_source(str(weights)) == (str(tmp_path), "style.safetensors")
    assert split_lora_source(str(tmp_path)) == (str(tmp_path), None)
    assert split_lora_source("owner/repo") == ("owner/repo", None)
    assert split_lora_source("owner/repo/sub/lora.safetensors") == ("owner/repo", "sub/lora.safetensors")
