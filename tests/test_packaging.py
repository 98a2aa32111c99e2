"""The wheel: built from the project's metadata without warnings, with every file the package reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "clear_adapters", "integrations", "model_cards")

BUILD = """
import sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
with warnings.catch_warnings(record=True) as caught:
    name = build_meta.build_wheel(sys.argv[1])
for w in caught:
    print(f"WARNING {w.category.__name__}: {w.message}")
print("WHEEL " + name)
"""


def test_wheel_builds_without_metadata_warnings_and_ships_its_data(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to the sources
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_work"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path / "dist"
    result = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines()
                if "Warning" in line and "byte-compil" not in line]
    assert warnings == [], warnings
    wheel = out / result.stdout.split("WHEEL ")[-1].strip()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {u.split(",")[0] for u in metadata.get_all("Project-URL")} >= {"Repository", "Issues", "Paper"}
    for needed in ("clear_adapters/templates/matrix.html.jinja", "clear_adapters/model_cards/adapter_card.md.jinja",
                   "clear_adapters/data/registry.toml", "clear_adapters/integrations/lora.py",
                   # the trained toy: a save_pretrained directory with tokenizers, its plugins, its CLEAR adapters
                   "clear_adapters/toy/toy-weights/pipeline/model_index.json",
                   "clear_adapters/toy/toy-weights/pipeline/tokenizer_2/tokenizer.json",
                   "clear_adapters/toy/toy-weights/pipeline/transformer/diffusion_pytorch_model.safetensors",
                   "clear_adapters/toy/toy-weights/variant/transformer/diffusion_pytorch_model.safetensors",
                   "clear_adapters/toy/toy-weights/lora/pytorch_lora_weights.safetensors",
                   "clear_adapters/toy/toy-weights/controlnet/diffusion_pytorch_model.safetensors",
                   "clear_adapters/toy/toy-weights/clear-r4/clear_adapter.safetensors",
                   "clear_adapters/toy/toy-weights/clear-r4/clear_config.json",
                   "clear_adapters/toy/toy-weights/clear-r2/clear_adapter.safetensors"):
        assert needed in names, needed
    toy = [info for info in zipfile.ZipFile(wheel).infolist() if "/toy/toy-weights/" in info.filename]
    assert sum(info.file_size for info in toy) <= 25 * 2**20  # the budget for the toy in the wheel
    # extras name only what the code imports: cv2 for Canny edges, xfuser for integrations/xdit.py
    assert set(metadata.get_all("Provides-Extra")) == {"dev", "controlnet", "xdit"}
