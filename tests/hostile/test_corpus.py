"""A second corpus of hostile inputs, written after the first fixes without looking at what they covered:
each must end in a specific library error (a ``ClearAdapterError``), leave every model bit-identical and
touch nothing outside the Hub cache. ``CASES`` maps a name to ``(build, expected error)``; ``build``
gets a small context and returns the call to make.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import clear_adapters
from clear_adapters import (AdapterNotFoundError, ClearAdapterError, IncompatibleModelError, IntegrityError,
                            InvalidAdapterError, InvalidArgumentError, MalformedResponseError)

from ._helpers import assert_unchanged, snapshot, unique_repo, write_raw_safetensors

KEY = "transformer_blocks.0.attn.to_q.weight"


class Ctx:
    def __init__(self, pipe, good, adapter_dir, tmp_path, hub_server, template):
        self.pipe, self.good, self.adapter_dir, self.tmp, self.hub = pipe, good, adapter_dir, tmp_path, hub_server
        self.template = template

    def tensors(self, change):
        tensors = load_file(str(self.good))
        change(tensors)
        path = self.tmp / "variant.safetensors"
        save_file(tensors, str(path), metadata={"window_size": "3"})
        return path

    def adapter(self, **config_changes):
        directory = self.tmp / "adapter"
        directory.mkdir(exist_ok=True)
        for item in self.adapter_dir.iterdir():
            (directory / item.name).write_bytes(item.read_bytes())
        config = json.loads((directory / "clear_config.json").read_text())
        config.update(config_changes)
        (directory / "clear_config.json").write_text(json.dumps(config))
        return directory

    def load(self, source, **kwargs):
        return lambda: clear_adapters.load(source, self.pipe, **kwargs)

    def repo(self, **fault):
        name = unique_repo("corpus")
        self.hub.copy_repo(self.template, name)  # a fresh repo, nothing of it cached, no upload
        self.hub.inject(name, fault.pop("path", "clear_config.json"), **fault)
        return name


def _empty_file(c):
    (c.tmp / "empty.safetensors").write_bytes(b"")
    return c.load(c.tmp / "empty.safetensors", window_size=3)


def _zero_header(c):
    return c.load(write_raw_safetensors(c.tmp / "zero.safetensors", b""), window_size=3)


def _header_not_object(c):
    return c.load(write_raw_safetensors(c.tmp / "arr.safetensors", b"{}" if False else b'{"__metadata__": [1]}'),
                  window_size=3)


def _spatial_wrong_rank(c):
    return c.load(c.tensors(lambda t: t.update({"transformer_blocks.0.attn.processor.spatial_weight": torch.ones(4)})))


def _spatial_disagree(c):
    def change(t):
        t["transformer_blocks.0.attn.processor.spatial_weight"] = torch.ones(1, 1, 1, 2, 1, 2, 1)
        t["transformer_blocks.1.attn.processor.spatial_weight"] = torch.ones(1, 1, 1, 4, 1, 4, 1)
    return c.load(c.tensors(change))


def _empty_tensor(c):
    return c.load(c.tensors(lambda t: t.update({KEY: torch.zeros(0, 32)})))


def _control_char_key(c):
    return c.load(c.tensors(lambda t: t.update({KEY + "\n": t[KEY].clone()})))


def _float64_overflow(c):
    return c.load(c.tensors(lambda t: t.update({KEY: t[KEY].double() * 1e300})))


def _config_is_a_directory(c):
    directory = c.adapter()
    (directory / "clear_config.json").unlink()
    (directory / "clear_config.json").mkdir()
    return c.load(directory)


def _config_nan_literal(c):
    directory = c.adapter()
    text = (directory / "clear_config.json").read_text().replace('"window_size": 3', '"window_size": NaN')
    (directory / "clear_config.json").write_text(text)
    return c.load(directory)


def _config_float_version(c):
    return c.load(c.adapter(format_version=1.0))


def _config_empty_layers(c):
    return c.load(c.adapter(layers=[]))


def _config_weights_nul(c):
    return c.load(c.adapter(weights="a\u0000b.safetensors"))


def _config_huge(c):
    directory = c.adapter()
    with open(directory / "clear_config.json", "r+b") as fh:
        fh.truncate(64 << 20)  # sparse, mostly NUL bytes
    return c.load(directory)


def _two_files_no_config(c):
    directory = c.tmp / "two"
    directory.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (directory / name).write_bytes(c.good.read_bytes())
    return c.load(directory)


def _empty_source(c):
    return c.load("")


def _source_none(c):
    return c.load(None)


def _pipe_is_a_string(c):
    return lambda: clear_adapters.load(c.good, "FluxPipeline")


def _controlnet_flag_string(c):
    return c.load(c.good, controlnet="no")


def _revision_traversal(c):
    return c.load("tester/some-adapter", revision="../../../../escaped")


def _revision_not_string(c):
    return c.load("tester/some-adapter", revision=123)


def _attach_window_string(c):
    return lambda: clear_adapters.attach(window_size="3", pipe=c.pipe)


def _attach_down_bool(c):
    return lambda: clear_adapters.attach(3, c.pipe, down_factor=True)


def _etag_empty(c):
    return c.load(c.repo(headers={"ETag": '""'}))


def _etag_dotdot(c):
    return c.load(c.repo(headers={"ETag": '".."'}))


def _commit_not_hex(c):
    return c.load(c.repo(headers={"X-Repo-Commit": "main"}))


def _weights_short_body_one_byte(c):
    return c.load(c.repo(path="clear_adapter.safetensors", short=1))


def _matrix_nested(c):
    report = c.tmp / "matrix.json"
    report.write_text("[" * 100_000 + "]" * 100_000)
    return lambda: clear_adapters.push(c.adapter_dir, unique_repo("m"), matrix=report)


def _push_revision_traversal(c):
    return lambda: clear_adapters.push(c.adapter_dir, unique_repo("r"), revision="../x")


def _push_fifo_weights(c):
    directory = c.adapter()
    (directory / "clear_adapter.safetensors").unlink()
    os.mkfifo(directory / "clear_adapter.safetensors")
    return lambda: clear_adapters.push(directory, unique_repo("f"))


def _base_state_dict_missing(c):
    return c.load(c.good, weight_mode="delta", base={"unrelated": torch.zeros(1)})


def _base_state_dict_nan(c):
    base = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(c.good)).items()}
    return c.load(c.good, weight_mode="delta", base=base)


def _header_length_past_end(c):
    path = c.tmp / "past.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return c.load(path, window_size=3)


CASES = {
    "empty file": (_empty_file, IntegrityError),
    "zero-length header": (_zero_header, IntegrityError),
    "__metadata__ not an object": (_header_not_object, IntegrityError),
    "spatial weight of wrong rank": (_spatial_wrong_rank, InvalidAdapterError),
    "spatial weights disagree": (_spatial_disagree, InvalidAdapterError),
    "empty tensor": (_empty_tensor, IncompatibleModelError),
    "key with a newline": (_control_char_key, IncompatibleModelError),
    "float64 beyond float32": (_float64_overflow, InvalidAdapterError),
    "config is a directory": (_config_is_a_directory, InvalidAdapterError),
    "config window NaN literal": (_config_nan_literal, InvalidAdapterError),
    "config float format_version": (_config_float_version, InvalidAdapterError),
    "config empty layers": (_config_empty_layers, InvalidAdapterError),
    "config weights with NUL": (_config_weights_nul, InvalidAdapterError),
    "config 64 MB": (_config_huge, IntegrityError),
    "two weights, no config": (_two_files_no_config, AdapterNotFoundError),
    "empty source": (_empty_source, InvalidArgumentError),
    "source None": (_source_none, InvalidArgumentError),
    "pipe is a string": (_pipe_is_a_string, IncompatibleModelError),
    "controlnet='no'": (_controlnet_flag_string, InvalidArgumentError),
    "revision with ../": (_revision_traversal, InvalidArgumentError),
    "revision not a string": (_revision_not_string, InvalidArgumentError),
    "attach window '3'": (_attach_window_string, InvalidArgumentError),
    "attach down_factor True": (_attach_down_bool, InvalidArgumentError),
    "empty ETag": (_etag_empty, MalformedResponseError),
    "ETag '..'": (_etag_dotdot, MalformedResponseError),
    "commit id 'main'": (_commit_not_hex, MalformedResponseError),
    "one-byte weights body": (_weights_short_body_one_byte, MalformedResponseError),
    "nested matrix report": (_matrix_nested, IntegrityError),
    "push revision ../x": (_push_revision_traversal, InvalidArgumentError),
    "push weights FIFO": (_push_fifo_weights, IntegrityError),
    "delta base lacks tensors": (_base_state_dict_missing, IncompatibleModelError),
    "delta base all NaN": (_base_state_dict_nan, InvalidAdapterError),
    "header length past the end": (_header_length_past_end, IntegrityError),
}


@pytest.fixture(scope="module")
def template(adapter_dir):
    name = unique_repo("corpus-template")
    clear_adapters.push(adapter_dir, name)
    return name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(CASES))
def test_unseen_hostile_input(pipe, good, adapter_dir, tmp_path, hub_server, no_backoff, template, name):
    build, expected = CASES[name]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"untouched")
    ctx = Ctx(pipe, good, adapter_dir, tmp_path / "work", hub_server, template)
    ctx.tmp.mkdir()
    before = snapshot(pipe)
    try:
        call = build(ctx)
        with pytest.raises(ClearAdapterError) as info:
            call()
    finally:
        hub_server.clear_faults()
    assert isinstance(info.value, expected), f"{type(info.value).__name__}: {info.value}"
    assert_unchanged(pipe, before)
    assert sorted(p.name for p in outside.iterdir()) == ["keep"] and (outside / "keep").read_bytes() == b"untouched"


def _cli_cases(adapter_dir, tmp):
    generate = ["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
                "--out", str(tmp / "o.png")]
    return {
        "info ''": ["info", ""],
        "info revision ../x": ["info", "tester/x", "--revision", "../x"],
        "generate model missing": ["generate", "--model", str(tmp / "nope"), "--adapter", "none", "--prompt", "x"],
        "generate device bogus": generate + ["--adapter", str(adapter_dir), "--device", "warp-drive"],
        "generate adapter is a directory of junk": generate + ["--adapter", str(tmp)],
        "push revision a..b": ["push", str(adapter_dir), "tester/x", "--revision", "a..b"],
        "push matrix /dev/zero": ["push", str(adapter_dir), "tester/x", "--matrix", "/dev/zero"],
        "bench unknown backend": ["bench", "attention", "--tokens", "8x8", "--window", "2", "--backend", "nope"],
        "bench blocks down beyond grid": ["bench", "blocks", "--tokens", "8x8", "--window", "2", "--down", "16"],
        "matrix pipeline missing": ["matrix", "--pipeline", str(tmp / "nope"), "--out", str(tmp / "m")],
    }


CLI_NAMES = sorted(_cli_cases(None, __import__("pathlib").Path(".")))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CLI_NAMES)
def test_unseen_cli_input(capsys, adapter_dir, tmp_path, name):
    from clear_adapters import cli

    argv = _cli_cases(adapter_dir, tmp_path)[name]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.strip(), err
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "m").exists()
