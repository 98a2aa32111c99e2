"""Registry, registry-to-Hub loading (against the local Hub server), CLI list/info/demo."""

import json
import os

import pytest
from huggingface_hub import HfApi

import clear_adapters
from clear_adapters import AdapterNotFoundError, OfflineError
from clear_adapters.cli import main
from clear_adapters.registry import list_adapters, lookup
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint


def test_registry_lists_the_published_checkpoints():
    names = {e.name for e in list_adapters()}
    assert {"flux-dev/r8", "flux-dev/r16", "flux-dev/r32", "flux-dev/r8-down4", "flux-dev/r16-down4",
            "flux-dev", "flux-schnell"} <= names
    for name, window, down, file in [("flux-dev/r8", 8, 1, "clear_local_8.safetensors"),
                                     ("flux-dev/r32", 32, 1, "clear_local_32.safetensors"),
                                     ("flux-dev/r16-down4", 16, 4, "clear_local_16_down_4.safetensors")]:
        entry = lookup(name)
        assert (entry.window_size, entry.down_factor, entry.filename, entry.repo_id) == (window, down, file,
                                                                                         "Huage001/CLEAR")
        assert entry.base_model == "black-forest-labs/FLUX.1-dev" and entry.provenance
    default = lookup("flux-dev")
    assert default.alias_of == "flux-dev/r16" and default.down_factor == 1  # linear default
    schnell = lookup("flux-schnell")
    assert schnell.zero_shot and schnell.base_model == "black-forest-labs/FLUX.1-schnell"
    assert schnell.filename == default.filename


def test_registry_name_loads_through_the_hub(hub_server, tmp_path):
    """`load("flux-dev", pipe)` is the real Hub path: hf_hub_download of the registry's repo and file."""
    pipe = tiny_flux_pipeline(0)
    api = HfApi()
    api.create_repo("Huage001/CLEAR", exist_ok=True)
    ck = write_reference_checkpoint(tmp_path / "clear_local_16.safetensors", pipe.transformer, 16)
    api.upload_file(path_or_fileobj=str(ck), path_in_repo="clear_local_16.safetensors", repo_id="Huage001/CLEAR")
    handle = clear_adapters.load("flux-dev", pipe)
    assert handle.spec.registry_entry.name == "flux-dev"
    assert handle.config.window_size == 16 and handle.spec.repo_id == "Huage001/CLEAR"
    assert str(handle.spec.weights_path).startswith(os.environ["HF_HUB_CACHE"])  # through the Hub cache
    clear_adapters.unload(pipe)
    with pytest.raises(AdapterNotFoundError, match="clear_local_8.safetensors not found in Huage001/CLEAR"):
        clear_adapters.load("flux-dev/r8", pipe)


def test_offline_and_uncached_is_a_clear_error(hub_server, monkeypatch):
    from hub_server import set_hub_offline

    pipe = tiny_flux_pipeline(0)
    set_hub_offline(monkeypatch)
    with pytest.raises(OfflineError, match="not in the local Hub cache"):
        clear_adapters.load("flux-dev/r32", pipe)
    assert not hasattr(pipe.transformer, "_clear_handle")


def test_cli_list_and_info(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "flux-dev/r16-down4" in out and "[zero-shot]" in out
    assert main(["list", "--json"]) == 0
    assert {e["name"] for e in json.loads(capsys.readouterr().out)} >= {"flux-dev", "flux-schnell"}
    assert main(["info", "flux-dev/r8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["window_size"] == 8 and info["filename"] == "clear_local_8.safetensors"
    assert main(["info", "flux-devv"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_demo_runs_offline_and_writes_png(tmp_path, capsys):
    from PIL import Image

    from clear_adapters.commands.core import run_demo

    out = tmp_path / "demo.png"
    rows = run_demo(out, sizes=(64, 128), steps=2)
    printed = capsys.readouterr().out
    assert "PSNR vs full" in printed and "wrote" in printed
    assert [r["grid"] for r in rows] == ["16x16", "32x32"]
    assert rows[1]["flop_fraction"] < rows[0]["flop_fraction"] < 1
    assert all(20 < r["psnr_db"] < 100 for r in rows)
    image = Image.open(out)
    assert image.width >= 3 * 128 and image.height >= 64 + 128
