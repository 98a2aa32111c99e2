"""examples/toy/train.py, the script that rebuilds every shipped toy weight: a smoke run of each stage
(``--quick``: a few steps) into a temporary directory, so the script cannot rot. The shipped weights come
from the full run (docs/TOY.md); this test checks the script, not the toy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_runs_and_writes_what_the_package_loads(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "toy" / "train.py"), "--out", str(tmp_path),
                             "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = json.loads((tmp_path / "training_log.json").read_text())
    stages = ("text", "vae", "decoder", "transformer", "variant", "lora", "controlnet", "clear_r4", "clear_r2")
    assert set(stages) <= set(log)
    assert all(log[s]["wall_s"] >= 0 and log[s]["cpu_s"] >= 0 for s in stages)
    for name in ("pipeline/model_index.json", "variant/model_index.json", "lora/pytorch_lora_weights.safetensors",
                 "controlnet/config.json", "clear-r4/clear_config.json", "clear-r2/clear_adapter.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "clear-r4" / "checkpoint").exists()  # what ships is the adapter, not the run
    assert "_name_or_path" not in json.loads((tmp_path / "controlnet" / "config.json").read_text())

    import clear_adapters
    from clear_adapters.artifact import check_adapter_dir
    from clear_adapters.toy.pipeline import toy_call_kwargs
    from diffusers import FluxPipeline
    from safetensors import safe_open

    config, weights = check_adapter_dir(tmp_path / "clear-r4")
    with safe_open(str(weights), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    import torch

    pipe = FluxPipeline.from_pretrained(str(tmp_path / "pipeline"), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clear_adapters.load(str(tmp_path / "clear-r4"), pipe)
    image = pipe("a red circle in the top left", output_type="pt", **toy_call_kwargs(num_inference_steps=2)).images
    assert image.shape == (1, 3, 32, 32)
