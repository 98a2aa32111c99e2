"""Honest cards: a compatibility matrix run on another pipeline is refused unless asked for, and the card
always says which pipeline, size and hardware produced its numbers, and how the library is installed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

import clear_adapters
from clear_adapters import ClearAdapterError
from clear_adapters.cli import main
from clear_adapters.publish import install_command, matrix_is_foreign
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BASE = "black-forest-labs/FLUX.1-dev"
CASES = [{"name": "controlnet/canny", "plugin": "controlnet", "status": "ok", "psnr": 60.1, "ssim": 1.0,
          "exact_at_full_window": True, "passed": True}]


def report(folder: Path, pipeline: str, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"pipeline": pipeline, "adapter": "/home/me/adapter", "width": 64, "height": 64, "steps": 2, "seed": 0,
            "device": "cpu", "dtype": "float32", "hardware": "CPU: Test CPU 9000, 2 cores",
            "summary": {"cases": 1, "passed": 1, "failed": 0, "skipped": 0}, "cases": CASES, **extra}
    (folder / "matrix.json").write_text(json.dumps(data))
    (folder / "matrix.md").write_text("| case |\n")
    return folder / "matrix.md"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.load(write_reference_checkpoint(root / "r3.safetensors", pipe.transformer, 3), pipe)
    return handle.save_pretrained(root / "adapter", base_model=BASE)


def test_tiny_report_on_a_flux_dev_adapter_is_refused_then_labelled(adapter, tmp_path, hub_server, capsys):
    tiny = report(tmp_path / "tiny", "tiny")
    repo = f"tester/cards-{uuid.uuid4().hex[:8]}"
    seen = len(hub_server.request_log)
    assert main(["push", str(adapter), repo, "--matrix", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert "refusing to put the compatibility matrix" in err and "'tiny'" in err and "--allow-foreign-matrix" in err
    assert hub_server.request_log[seen:] == []  # refused before anything reached the Hub

    assert main(["push", str(adapter), repo, "--matrix", str(tiny), "--allow-foreign-matrix"]) == 0
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert "on pipeline `tiny` (clear-adapters' random-weight test pipeline)" in card
    assert "at 64×64 px on CPU: Test CPU 9000, 2 cores" in card
    assert "Where these numbers come from:** it was run on 'tiny'" in card and f"on {BASE}" in card
    assert "/home/me" not in card
    command, page = install_command()
    assert f"Install with `{command}`" in card and f"[clear-adapters]({page})" in card
    assert "pypi.org" not in card and "clear-adapters @ git+https://" in command  # not an index it is not on


def test_the_base_model_or_a_variant_is_not_foreign(adapter, tmp_path):
    for pipeline, foreign in ((BASE, False), ("Black-Forest-Labs/flux.1-DEV", False),
                              ("black-forest-labs/FLUX.1-dev-fp8", False), ("black-forest-labs/FLUX.1-schnell", True),
                              ("someone/FLUX.1-dev", True), ("./my-local-flux", True), ("tiny", True)):
        meta = {"pipeline": pipeline}
        assert bool(matrix_is_foreign({"meta": meta}, BASE)) is foreign, pipeline
    assert "does not record which pipeline" in matrix_is_foreign({"meta": {}}, BASE)
    result = clear_adapters.push(adapter, f"tester/cards-{uuid.uuid4().hex[:8]}",
                                 matrix=report(tmp_path / "dev", BASE, hardware="NVIDIA H100 (CUDA 12.8)"))
    card = Path(hf_hub_download(result.repo_id, "README.md")).read_text()
    assert f"on pipeline `{BASE}`" in card and "on NVIDIA H100 (CUDA 12.8)" in card
    assert "Where these numbers come from" not in card
    with pytest.raises(ClearAdapterError, match="not black-forest-labs/FLUX.1-dev or a variant"):
        clear_adapters.push(adapter, result.repo_id,
                            matrix=report(tmp_path / "schnell", "black-forest-labs/FLUX.1-schnell"))
