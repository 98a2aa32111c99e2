"""Hostile local files: broken, crafted or surprising safetensors files and the paths that name them.

Each test asserts the exact error class, that the message names the file or tensor, and that every
parameter, buffer and processor of the pipeline is bit-identical afterwards.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clear_adapters
from clear_adapters import AdapterNotFoundError, IntegrityError, InvalidAdapterError

from ._helpers import assert_unchanged, snapshot, write_raw_safetensors

KEY = "transformer_blocks.1.attn.to_k.weight"


def variant(good, path, mutate=None, metadata=None):
    """``good`` with its tensors changed by ``mutate`` and its header replaced by ``metadata``."""
    tensors = load_file(str(good))
    if metadata is None:
        with safe_open(str(good), framework="pt") as fh:
            metadata = fh.metadata()
    if mutate is not None:
        mutate(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def refused(pipe, source, error, match, **kwargs):
    before = snapshot(pipe)
    with pytest.raises(error, match=match) as info:
        clear_adapters.load(source, pipe, **kwargs)
    assert type(info.value) is error
    assert_unchanged(pipe, before)
    return info.value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused_naming_the_tensor(pipe, good, tmp_path, value):
    def poison(t):
        t[KEY][3, 5] = value

    path = variant(good, tmp_path / "poisoned.safetensors", poison)
    refused(pipe, path, InvalidAdapterError, rf"{KEY}.*not finite")


def test_values_that_overflow_the_model_dtype_are_refused(good, tmp_path):
    from clear_adapters.testing import tiny_flux_transformer

    model = tiny_flux_transformer(0).to(torch.float16)
    path = variant(good, tmp_path / "big.safetensors", lambda t: t[KEY].mul_(0).add_(1e6))
    refused(model, path, InvalidAdapterError, rf"{KEY}.*float16")
    handle = clear_adapters.load(good, model)  # the same file without the overflow loads
    assert handle.active
    clear_adapters.unload(model)


def test_both_key_styles_for_one_tensor_are_refused_naming_both(pipe, good, tmp_path):
    def duplicate(t):
        t["transformer." + KEY] = t[KEY] * 2

    path = variant(good, tmp_path / "dup.safetensors", duplicate)
    error = refused(pipe, path, InvalidAdapterError, "twice")
    assert f"'{KEY}'" in str(error) and f"'transformer.{KEY}'" in str(error)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn, torch.uint8])
def test_non_float_tensors_are_refused_naming_the_dtype(pipe, good, tmp_path, dtype):
    def cast(t):
        t[KEY] = t[KEY].to(dtype)

    path = variant(good, tmp_path / "cast.safetensors", cast)
    refused(pipe, path, InvalidAdapterError, rf"{KEY}.*{str(dtype).removeprefix('torch.')}")


def test_truncated_file_is_an_integrity_error_naming_it(pipe, good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 100])
    refused(pipe, path, IntegrityError, "truncated.safetensors")


@pytest.mark.parametrize("case", ["beyond-the-end", "overlap", "hole", "wrong-size", "negative"])
def test_bad_tensor_offsets_are_an_integrity_error_naming_the_tensor(pipe, tmp_path, case):
    data = bytes(64)
    offsets = {"beyond-the-end": ([0, 32], [32, 128]), "overlap": ([0, 32], [16, 48]), "hole": ([0, 16], [32, 64]),
               "wrong-size": ([0, 32], [32, 60]), "negative": ([0, 32], [-8, 64])}[case]
    header = {"__metadata__": {"window_size": "3"},
              "transformer_blocks.0.attn.to_q.weight": {"dtype": "F32", "shape": [8], "data_offsets": offsets[0]},
              KEY: {"dtype": "F32", "shape": [8], "data_offsets": offsets[1]}}
    path = write_raw_safetensors(tmp_path / f"{case}.safetensors", header, data)
    refused(pipe, path, IntegrityError, rf"{case}\.safetensors.*(offsets|{KEY})")


def test_deeply_nested_header_is_an_integrity_error(pipe, tmp_path):
    path = write_raw_safetensors(tmp_path / "nested.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    refused(pipe, path, IntegrityError, "nested.safetensors.*header")


def test_header_with_a_non_object_entry_is_an_integrity_error(pipe, tmp_path):
    path = write_raw_safetensors(tmp_path / "entry.safetensors", {KEY: [1, 2, 3]})
    refused(pipe, path, IntegrityError, rf"entry.safetensors.*{KEY}")


def test_unreadable_header_values_lose_to_explicit_arguments_and_are_named_otherwise(pipe, good, tmp_path):
    bad_window = variant(good, tmp_path / "w.safetensors", metadata={"window_size": "abc"})
    refused(pipe, bad_window, InvalidAdapterError, r"w\.safetensors.*window_size.*'abc'")
    bad_down = variant(good, tmp_path / "d.safetensors", metadata={"window_size": "3", "down_factor": "0"})
    refused(pipe, bad_down, InvalidAdapterError, r"d\.safetensors.*down_factor.*'0'")
    before = snapshot(pipe)
    for path, kwargs in ((bad_window, {"window_size": 3}), (bad_down, {"down_factor": 1})):
        handle = clear_adapters.load(path, pipe, **kwargs)  # what the caller says wins over a bad header
        assert (handle.config.window_size, handle.config.down_factor) == (3, 1)
        clear_adapters.unload(pipe)
    assert_unchanged(pipe, before)


def _adapter_copy(adapter_dir, tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    for item in adapter_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "dev-zero"])
def test_weights_named_by_the_config_must_be_a_regular_file(pipe, adapter_dir, tmp_path, kind):
    directory = _adapter_copy(adapter_dir, tmp_path)
    weights = directory / json.loads((directory / "clear_config.json").read_text())["weights"]
    weights.unlink()
    if kind == "directory":
        weights.mkdir()
    elif kind == "fifo":
        os.mkfifo(weights)  # opening it for reading would block forever
    elif kind == "dev-zero":
        weights.symlink_to("/dev/zero")  # reading it would never end
    error = AdapterNotFoundError if kind == "missing" else InvalidAdapterError
    refused(pipe, directory, error, weights.name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_special_files_given_directly_are_refused(pipe, tmp_path, source):
    if source == "fifo":
        source = tmp_path / "adapter.safetensors"
        os.mkfifo(source)
    refused(pipe, source, InvalidAdapterError, "not a regular file", window_size=3)


def test_over_long_names_are_not_found_errors(pipe):
    for name in ["x" * 5000 + ".safetensors", "/tmp/" + "y" * 300 + "/a.safetensors", "a/" * 3000 + "b.safetensors"]:
        refused(pipe, name, AdapterNotFoundError, "(no such|not found|too long)")


def test_a_huge_declared_header_is_refused_before_it_is_read(pipe, tmp_path):
    # sparse: 1 GiB of apparent size, nothing on disk; the header is never read into memory
    path = write_raw_safetensors(tmp_path / "huge.safetensors", b"{" + b" " * 15, declared_len=1 << 30,
                                 pad_to=(1 << 30) + 8)
    refused(pipe, path, IntegrityError, r"huge\.safetensors.*header of 1073741824 bytes.*100000000")


BAD_INDEXES = {
    "not json": b"{not json",
    "nested": b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "list": b'{"weight_map": [1, 2]}',
    "no map": b'{"metadata": {}}',
    "not utf-8": b'\xff\xfe{"weight_map": {}}',
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_malformed_delta_base_index_is_an_integrity_error(pipe, good, tmp_path, case):
    base = tmp_path / "base"
    base.mkdir()
    (base / "diffusion_pytorch_model.safetensors.index.json").write_bytes(BAD_INDEXES[case])
    refused(pipe, good, IntegrityError, r"index\.json.*shard index", weight_mode="delta", base=base)


@pytest.mark.parametrize("form", ["relative", "absolute", "subfolder"])
def test_delta_base_index_may_not_name_files_outside_the_base(pipe, good, tmp_path, form):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(good.read_bytes())  # a perfectly readable file: only its place is wrong
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    shard = {"relative": "../outside.safetensors", "absolute": str(outside), "subfolder": "sub/x.safetensors"}[form]
    index = {"weight_map": {key: shard for key in load_file(str(good))}}
    (base / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    refused(pipe, good, IntegrityError, r"index\.json.*outside\.safetensors|index\.json.*x\.safetensors",
            weight_mode="delta", base=base)
