"""Hostile command lines: every bad input is one line on stderr and exit status 2, never a traceback.

All run in-process through ``clear_adapters.cli.main`` (fast: no interpreter start per case).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from clear_adapters import cli



def message_lines(err: str) -> list[str]:
    """stderr without progress-bar lines (tqdm, diffusers' per-step bar): what the user reads as messages."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]

def run(argv, capsys):
    """(exit status, stdout, stderr) of ``clear-adapters ARGV``; argparse's own exits included."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory, good):
    root = tmp_path_factory.mktemp("cli")
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "badheader.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    from clear_adapters.testing import tiny_flux_transformer, write_reference_checkpoint

    write_reference_checkpoint(root / "d2.safetensors", tiny_flux_transformer(0), 3, down_factor=2)
    return root


ARGPARSE_CASES = {
    "window nan": ["generate", "--model", "tiny", "--prompt", "x", "--window-size", "nan"],
    "window zero": ["generate", "--model", "tiny", "--prompt", "x", "--window-size", "0"],
    "window negative": ["generate", "--model", "tiny", "--prompt", "x", "--window-size", "-3"],
    "window inf": ["generate", "--model", "tiny", "--prompt", "x", "--window-size", "inf"],
    "window huge": ["generate", "--model", "tiny", "--prompt", "x", "--window-size", "1e308"],
    "height zero": ["generate", "--model", "tiny", "--prompt", "x", "--height", "0"],
    "steps negative": ["generate", "--model", "tiny", "--prompt", "x", "--steps", "-1"],
    "guidance nan": ["generate", "--model", "tiny", "--prompt", "x", "--guidance", "nan"],
    "bench tokens zero": ["bench", "attention", "--tokens", "0x5", "--window", "2"],
    "bench tokens text": ["bench", "attention", "--tokens", "abc", "--window", "2"],
    "bench window nan": ["bench", "attention", "--tokens", "8x8", "--window", "nan"],
    "bench heads zero": ["bench", "attention", "--tokens", "8x8", "--window", "2", "--heads", "0"],
    "bench down zero": ["bench", "attention", "--tokens", "8x8", "--window", "2", "--down", "0"],
    "bench sweep bad": ["bench", "attention", "--window", "2", "--sweep", "8x8,x9"],
    "bench repeats zero": ["bench", "attention", "--tokens", "8x8", "--window", "2", "--repeats", "0"],
    "bench blocks zero": ["bench", "blocks", "--tokens", "8x8", "--window", "2", "--block", "0"],
    "bench blocks tokens": ["bench", "blocks", "--tokens", "8x-8", "--window", "2"],
    "demo sizes": ["demo", "--sizes", "0,abc"],
    "demo steps": ["demo", "--steps", "0"],
    "matrix window": ["matrix", "--window-size", "-inf"],
    "matrix steps": ["matrix", "--steps", "0"],
}


@pytest.mark.parametrize("name", sorted(ARGPARSE_CASES))
def test_bad_arguments_are_argparse_errors(capsys, name):
    code, out, err = run(ARGPARSE_CASES[name], capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("clear-adapters")
    assert "error: argument" in err


@pytest.mark.parametrize("case", ["truncated", "badheader", "grid", "missing", "pickle", "repo-id", "window-file",
                                  "demo-sizes", "demo-toy-sizes", "demo-tiny-prompt", "bench-no-tokens"])
def test_library_errors_are_one_line_and_exit_2(capsys, files, tmp_path, case):
    generate = ["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x.png")]
    argv = {
        "truncated": generate + ["--adapter", str(files / "truncated.safetensors"), "--window-size", "3"],
        "badheader": generate + ["--adapter", str(files / "badheader.safetensors"), "--window-size", "3"],
        "grid": generate + ["--adapter", str(files / "d2.safetensors"), "--height", "68", "--width", "68"],
        "missing": generate + ["--adapter", str(files / "nothing.safetensors")],
        "pickle": generate + ["--adapter", str(files / "weights.bin")],
        "repo-id": ["info", "owner/.."],
        "window-file": ["info", str(files / "badheader.safetensors")],
        "demo-sizes": ["demo", "--pipeline", "tiny", "--sizes", "30", "--out", str(tmp_path / "x.png")],
        # the other bed's options are refused, not silently ignored
        "demo-toy-sizes": ["demo", "--sizes", "128", "--out", str(tmp_path / "x.png")],
        "demo-tiny-prompt": ["demo", "--pipeline", "tiny", "--prompt", "a red circle", "--out", str(tmp_path / "x.png")],
        "bench-no-tokens": ["bench", "attention", "--window", "2"],
    }[case]
    code, out, err = run(argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "x.png").exists()


def test_debug_shows_the_traceback(capsys, files):
    code, out, err = run(["--debug", "info", str(files / "badheader.safetensors")], capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_push_errors_are_one_line(capsys, adapter_dir, hub_token):
    code, out, err = run(["push", str(adapter_dir), "tester/cli-secret", "--message", f"uses {hub_token}"], capsys)
    assert code == 2 and len(message_lines(err)) == 1 and hub_token not in err + out
    code, out, err = run(["push", str(adapter_dir), "not a repo id"], capsys)
    assert code == 2 and len(message_lines(err)) == 1


class _Stop(Exception):
    """Raised right after load: the test needs the handle, not an image."""


def test_generate_keeps_the_adapters_proportional_attention_unless_told(capsys, adapter_dir, tmp_path, monkeypatch):
    from clear_adapters import api

    directory = tmp_path / "adapter"
    directory.mkdir()
    for item in adapter_dir.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    config = json.loads((directory / "clear_config.json").read_text())
    config["proportional_attention"] = True
    (directory / "clear_config.json").write_text(json.dumps(config))
    handles, real_load = [], api.load

    def recording_load(*args, **kwargs):
        handles.append(real_load(*args, **kwargs))
        raise _Stop

    monkeypatch.setattr(api, "load", recording_load)
    base = ["generate", "--model", "tiny", "--adapter", str(directory), "--prompt", "x",
            "--out", str(tmp_path / "o.png")]
    for extra, expected in (([], True), (["--no-proportional-attention"], False), (["--proportional-attention"], True)):
        code, out, err = run(base + extra, capsys)
        assert code == 1 and "_Stop" in err, err  # stopped on purpose once the adapter was loaded
        assert handles[-1].config.proportional_attention is expected, extra


def test_generate_with_a_file_of_other_tensors(capsys, good, tmp_path):
    tensors = load_file(str(good))
    tensors["unrelated.weight"] = tensors.pop("transformer_blocks.0.attn.to_q.weight")
    save_file(tensors, str(tmp_path / "other.safetensors"))
    code, out, err = run(["generate", "--model", "tiny", "--prompt", "x", "--window-size", "3",
                          "--adapter", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and len(message_lines(err)) == 1 and "unrelated.weight" in err
