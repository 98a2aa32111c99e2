"""CLEAR on FLUX variants (schnell-like, Kontext, Fill, Img2Img, fine-tuned) and weight_mode='delta'."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from clear_adapters import api
from clear_adapters.base_weights import load_base_tensors
from clear_adapters.compat import FULL_WINDOW, max_difference
from clear_adapters.integrations.variants import delta_weights
from clear_adapters.testing import tiny_finetuned_transformer, tiny_flux_fill_pipeline, tiny_flux_pipeline, \
    tiny_flux_transformer, tiny_test_image, write_reference_checkpoint
from clear_adapters.weights import attention_layers, normalize_keys, read_adapter_file

# the tiny pipelines run fastest on one thread on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5
IMAGE = tiny_test_image(64, seed=1)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("variants") / "clear.safetensors",
                                      tiny_flux_transformer(0), 4)


def generate(pipe, **kwargs):
    return pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images[0]


def attention_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, attn in attention_layers(model):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            if proj == "to_out.0" and not hasattr(attn, "to_out"):
                continue
            module = attn.get_submodule(proj)
            for pname, param in getattr(module, "base_layer", module).named_parameters(recurse=False):
                out[f"{name}.{proj}.{pname}"] = param.detach().float().clone()
    return out


# ------------------------------------------------------------------------------------------------ pipelines
def _kontext():
    from diffusers import FluxKontextPipeline

    return tiny_flux_pipeline(0, pipeline_class=FluxKontextPipeline), \
        {"image": IMAGE, "max_area": 64 * 64, "_auto_resize": False}, {"image": None}


def _fill():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    return tiny_flux_fill_pipeline(0), {"image": IMAGE, "mask_image": mask}, \
        {"mask_image": Image.new("L", (64, 64), 255)}


def _img2img():
    from diffusers import FluxImg2ImgPipeline

    return tiny_flux_pipeline(0, pipeline_class=FluxImg2ImgPipeline), {"image": IMAGE, "strength": 0.5}, \
        {"image": Image.new("RGB", (64, 64), (128, 128, 128))}


def _schnell():
    return tiny_flux_pipeline(0, guidance_embeds=False), {"guidance_scale": 0.0}, None


@pytest.mark.parametrize("variant", ["kontext", "fill", "img2img", "schnell"])
def test_variant_exact_at_full_window_and_plugin_matters(variant, adapter):
    pipe, call, off = {"kontext": _kontext, "fill": _fill, "img2img": _img2img, "schnell": _schnell}[variant]()
    full = generate(pipe, **call)
    if off is not None:
        assert max_difference(full, generate(pipe, **{**call, **off})) > 1e-4
    api.attach(FULL_WINDOW, pipe)
    assert max_difference(generate(pipe, **call), full) <= EXACT
    api.unload(pipe)
    api.attach(3, pipe)
    assert max_difference(generate(pipe, **call), full) > 1e-4
    api.unload(pipe)
    handle = api.load(adapter, pipe)
    clear = generate(pipe, **call)
    steps_run = 1 if variant == "img2img" else 2  # strength 0.5 of 2 steps denoises one
    assert handle.kernel_calls == steps_run * len(attention_layers(pipe.transformer))
    if off is not None:
        assert max_difference(clear, generate(pipe, **{**call, **off})) > 1e-4
    api.unload(pipe)
    assert max_difference(generate(pipe, **call), full) == 0.0


def test_fill_transformer_takes_the_concatenated_channels():
    pipe = tiny_flux_fill_pipeline(0)
    latent = pipe.vae.config.latent_channels
    assert pipe.transformer.config.in_channels == 4 * latent + 4 * latent + 4 * pipe.vae_scale_factor ** 2
    assert pipe.transformer.out_channels == 4 * latent
    base = tiny_flux_transformer(0)  # a fine-tune of the base: attention weights start from it
    assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight,
                       base.transformer_blocks[0].attn.to_q.weight)


def test_kontext_reference_tokens_form_a_second_frame_on_the_same_grid(adapter):
    pipe, call, _ = _kontext()
    seen = {}

    def record(module, args, kwargs):
        seen["img_ids"] = kwargs["img_ids"].detach().clone()

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    generate(pipe, **call)
    hook.remove()
    ids = seen["img_ids"].round().long()
    target, reference = ids[ids[:, 0] == 0], ids[ids[:, 0] == 1]
    assert target.shape[0] == reference.shape[0] == 16 * 16
    assert torch.equal(target[:, 1:], reference[:, 1:])  # same (row, col): the window spans both frames
    from clear_adapters.geometry import Geometry

    geometry = Geometry.from_ids(ids, 32)
    assert [g.frame for g in geometry.grids] == [0, 1]


# ------------------------------------------------------------------------------------------------ delta mode
def test_delta_equals_replace_when_the_variant_is_the_base(adapter, tmp_path):
    replace_pipe = tiny_flux_pipeline(0)
    api.load(adapter, replace_pipe)
    replaced = attention_weights(replace_pipe.transformer)
    replace_image = generate(replace_pipe)

    base = tiny_flux_transformer(0)
    base.save_pretrained(tmp_path / "base" / "transformer")  # a pipeline-layout directory
    for source in (base.state_dict(), str(tmp_path / "base"), str(tmp_path / "base" / "transformer")):
        pipe = tiny_flux_pipeline(0)
        api.load(adapter, pipe, weight_mode="delta", base=source)
        delta = attention_weights(pipe.transformer)
        assert max(float((delta[k] - replaced[k]).abs().max()) for k in replaced) <= 1e-6
        assert max_difference(generate(pipe), replace_image) <= EXACT


def test_delta_follows_the_formula_on_a_finetuned_variant(adapter):
    base = tiny_flux_transformer(0)
    pipe = tiny_flux_pipeline(0)
    pipe.register_modules(transformer=tiny_finetuned_transformer(pipe.transformer, seed=3, scale=0.1))
    variant = attention_weights(pipe.transformer)
    full = generate(pipe)
    clear = normalize_keys(read_adapter_file(adapter)[0])
    base_tensors = attention_weights(base)
    assert max(float((variant[k] - base_tensors[k]).abs().max()) for k in variant) > 1e-3  # it is a fine-tune

    api.load(adapter, pipe, weight_mode="delta", base=base.state_dict())
    written = attention_weights(pipe.transformer)
    expected = delta_weights(variant, clear, base_tensors)
    assert max(float((written[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    delta_image = generate(pipe)
    api.unload(pipe)
    assert all(torch.equal(attention_weights(pipe.transformer)[k], variant[k]) for k in variant)  # bit-exact
    assert max_difference(generate(pipe), full) == 0.0

    api.load(adapter, pipe, weight_mode="replace")
    written = attention_weights(pipe.transformer)
    assert all(torch.equal(written[k], clear[k].float()) for k in clear)
    assert max_difference(generate(pipe), delta_image) > 1e-5  # the two modes differ on a real fine-tune
    api.unload(pipe)


def test_delta_base_from_the_hub_reads_only_the_needed_tensors(adapter, hub_server, tmp_path, caplog):
    from huggingface_hub import HfApi, try_to_load_from_cache

    base = tiny_flux_transformer(0)
    base.save_pretrained(tmp_path / "repo" / "transformer", max_shard_size="60KB")  # sharded, with an index
    shards = sorted(p.name for p in (tmp_path / "repo" / "transformer").glob("*.safetensors"))
    assert len(shards) > 2
    repo_id = f"tester/tiny-flux-{uuid.uuid4().hex[:8]}"
    hub = HfApi()
    hub.create_repo(repo_id)
    hub.upload_folder(repo_id=repo_id, folder_path=str(tmp_path / "repo"))

    keys = ["transformer_blocks.1.attn.to_k.weight", "single_transformer_blocks.0.attn.to_q.bias"]
    with caplog.at_level(logging.INFO, logger="clear_adapters"):
        tensors = load_base_tensors(repo_id, keys)
    state = base.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in keys)
    assert "range requests" in caplog.text
    for shard in shards:  # nothing was downloaded whole
        assert not isinstance(try_to_load_from_cache(repo_id, f"transformer/{shard}"), str)

    pipe = tiny_flux_pipeline(0)
    pipe.register_modules(transformer=tiny_finetuned_transformer(pipe.transformer, seed=4))
    variant = attention_weights(pipe.transformer)
    api.load(adapter, pipe, weight_mode="delta", base=repo_id)
    expected = delta_weights(variant, normalize_keys(read_adapter_file(adapter)[0]), attention_weights(base))
    written = attention_weights(pipe.transformer)
    assert max(float((written[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    api.unload(pipe)
    assert Path(adapter).is_file()
