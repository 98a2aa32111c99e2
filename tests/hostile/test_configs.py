"""Hostile configs and arguments: clear_config.json fields, header values and the caller's own values.

Each test asserts the exact error class, that the message names the field, and that the pipeline is
bit-identical afterwards.
"""

from __future__ import annotations

import json

import pytest
import torch

import clear_adapters
from clear_adapters import IncompatibleModelError, IntegrityError, InvalidAdapterError, InvalidArgumentError

from ._helpers import assert_unchanged, snapshot


def refused(pipe, call, error, match):
    before = snapshot(pipe)
    with pytest.raises(error, match=match) as info:
        call()
    assert type(info.value) is error, type(info.value)
    assert_unchanged(pipe, before)
    return info.value


def edited(adapter_dir, tmp_path, **changes):
    """A copy of the adapter directory with ``clear_config.json`` fields replaced (None deletes)."""
    target = tmp_path / "adapter"
    target.mkdir(exist_ok=True)
    for item in adapter_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "clear_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "clear_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("value", ["no", "yes", 1, 0.0])
def test_proportional_attention_must_be_a_bool(pipe, good, value):
    refused(pipe, lambda: clear_adapters.load(good, pipe, proportional_attention=value), InvalidArgumentError,
            rf"proportional_attention.*{value!r}")


@pytest.mark.parametrize("kwargs,field", [
    ({"window_size": 1e308}, "window_size"), ({"window_size": float("nan")}, "window_size"),
    ({"window_size": -3}, "window_size"), ({"window_size": "3"}, "window_size"), ({"window_size": True}, "window_size"),
    ({"down_factor": 0}, "down_factor"), ({"down_factor": 2.0}, "down_factor"), ({"down_factor": 10**9}, "down_factor"),
    ({"backend": "cuda"}, "backend"), ({"weight_mode": "bogus"}, "weight_mode"),
])
def test_load_arguments_are_validated_before_anything_changes(pipe, good, kwargs, field):
    refused(pipe, lambda: clear_adapters.load(good, pipe, **kwargs), InvalidArgumentError, field)


@pytest.mark.parametrize("kwargs,field", [
    ({"window_size": 1e308}, "window_size"), ({"window_size": 0}, "window_size"),
    ({"window_size": 3, "down_factor": 10**9}, "down_factor"), ({"window_size": 3, "down_factor": -1}, "down_factor"),
    ({"window_size": 3, "proportional_attention": "no"}, "proportional_attention"),
    ({"window_size": 3, "backend": "nope"}, "backend"),
])
def test_attach_arguments_are_validated_before_anything_changes(pipe, kwargs, field):
    refused(pipe, lambda: clear_adapters.attach(pipe=pipe, **kwargs), InvalidArgumentError, field)


def test_config_layers_are_checked_against_the_file_at_load(pipe, adapter_dir, tmp_path):
    config = json.loads((adapter_dir / "clear_config.json").read_text())
    directory = edited(adapter_dir, tmp_path, layers=config["layers"][:-1])
    refused(pipe, lambda: clear_adapters.load(directory, pipe), InvalidAdapterError,
            r"layers of clear_config.json.*single_transformer_blocks.1.attn")


@pytest.mark.parametrize("field,value", [("window_size", 1e308), ("window_size", 1e7), ("down_factor", 10**6),
                                         ("window_size", "3"), ("proportional_attention", "no")])
def test_config_values_out_of_range_are_named(pipe, adapter_dir, tmp_path, field, value):
    directory = edited(adapter_dir, tmp_path, **{field: value})
    refused(pipe, lambda: clear_adapters.load(directory, pipe), InvalidAdapterError, rf"clear_config.json.*{field}")


def test_deeply_nested_config_is_an_integrity_error(pipe, adapter_dir, tmp_path):
    directory = edited(adapter_dir, tmp_path)
    (directory / "clear_config.json").write_text('{"provenance": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(pipe, lambda: clear_adapters.load(directory, pipe), IntegrityError, "clear_config.json")


def test_config_that_is_not_utf8_or_not_an_object_is_named(pipe, adapter_dir, tmp_path):
    directory = edited(adapter_dir, tmp_path)
    (directory / "clear_config.json").write_bytes(b"\xff\xfe\x00garbage")
    refused(pipe, lambda: clear_adapters.load(directory, pipe), IntegrityError, "clear_config.json")
    (directory / "clear_config.json").write_text("[1, 2, 3]")
    refused(pipe, lambda: clear_adapters.load(directory, pipe), InvalidAdapterError, "clear_config.json.*object")


@pytest.mark.parametrize("source", ["owner/..", "owner/.", "-owner/name", "owner/na--..me"])
def test_invalid_repo_ids_are_argument_errors(pipe, source):
    refused(pipe, lambda: clear_adapters.load(source, pipe), InvalidArgumentError, rf"{source}.*repo id")


def transformer_inputs(height: int, width: int, text: int = 4) -> dict:
    """Inputs of one tiny-transformer forward for an image of height x width tokens."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return dict(hidden_states=torch.randn(1, height * width, 16), encoder_hidden_states=torch.randn(1, text, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([1.0]), guidance=torch.tensor([3.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3))


def test_down_factor_that_does_not_divide_the_grid_names_the_pipelines_pixels(pipe):
    before = snapshot(pipe)
    clear_adapters.attach(3, pipe, down_factor=2)
    try:
        # a 68 px image is 17x17 tokens at the tiny pipeline's 4 px per token: not divisible by 2
        with pytest.raises(InvalidArgumentError,
                           match=r"17x17 tokens grid \(68x68 px.*down_factor 2.*multiples of 8 px"):
            pipe.transformer(**transformer_inputs(17, 17))
        with torch.no_grad():
            pipe.transformer(**transformer_inputs(16, 16))  # 64 px: fine
    finally:
        clear_adapters.unload(pipe)
    assert_unchanged(pipe, before)


def test_attention_flops_validates_sizes(pipe, good):
    handle = clear_adapters.attach(3, pipe, down_factor=2)
    try:
        for height, width in ((66, 64), (68, 64), (0, 64), (-8, 64)):
            with pytest.raises(InvalidArgumentError, match="height"):
                handle.attention_flops(height, width)
    finally:
        clear_adapters.unload(pipe)


def test_mismatched_down_factor_message_is_true(pipe, tmp_path):
    from clear_adapters.testing import write_reference_checkpoint

    path = write_reference_checkpoint(tmp_path / "d2.safetensors", pipe.transformer, 3, down_factor=2)
    refused(pipe, lambda: clear_adapters.load(path, pipe, down_factor=1), IncompatibleModelError,
            r"d2.safetensors.*down_factor=2")
    refused(pipe, lambda: clear_adapters.load(path, pipe, down_factor=4), IncompatibleModelError,
            r"d2.safetensors.*down_factor=2")


def test_attach_on_a_bare_bf16_model_validates_the_window():
    from clear_adapters.testing import tiny_flux_transformer

    model = tiny_flux_transformer(0).to(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="window_size"):
        clear_adapters.attach(float("inf"), model)
    assert_unchanged(model, before)
