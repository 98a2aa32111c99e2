"""`clear-adapters bench pipeline`: whole generations, full attention vs CLEAR, on any resolvable pipeline."""

import json
import math

import pytest

from clear_adapters import ClearAdapterError
from clear_adapters.cli import main
from clear_adapters.pipeline_bench import BenchInputError, bench_pipeline
from clear_adapters.testing import tiny_flux_pipeline

# tiny models are overhead-bound: one thread, or every small op waits for the second one (conftest)
pytestmark = pytest.mark.usefixtures("single_thread")

PER_SIZE = {"step_s_full", "step_s_clear", "speedup", "attention_share", "peak_bytes", "psnr", "gen_s_full",
            "gen_s_clear"}


def test_cli_writes_json_and_plot_with_every_figure(tmp_path, capsys):
    from PIL import Image

    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    code = main(["bench", "pipeline", "--pipeline", "tiny", "--sizes", "32,48", "--steps", "2", "--window", "3",
                 "--out", str(out), "--plot", str(plot), "--no-progress", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    assert printed == result and result["installed_with"] == "attach" and result["window"] == 3
    assert [p["size"] for p in result["sizes"]] == [32, 48]
    for p in result["sizes"]:
        assert PER_SIZE <= set(p)
        assert len(p["step_times_full"]) == len(p["step_times_clear"]) == 2  # one forward per step
        assert p["speedup"] == pytest.approx(p["step_s_full"] / p["step_s_clear"])
        assert 0 < p["attention_share"] <= 1 and p["attention_max_abs_error"] <= 1e-4
        assert p["peak_bytes"]["full"] > 0 and p["peak_bytes"]["clear"] > 0
        assert math.isfinite(p["psnr"])  # window 3 < grid: CLEAR changes the image
        assert p["text_tokens"] > 0 and p["grid"] == [p["size"] // 4] * 2
    assert {"cpu", "cores", "threads", "torch", "load_1min"} <= set(result["conditions"])
    assert Image.open(plot).size[0] > 100


def test_window_covering_the_image_reproduces_full_attention():
    """The comparison itself is exact: a window larger than the grid is full attention, same seed."""
    result = bench_pipeline(pipe=tiny_flux_pipeline(), source=None, sizes=[32], steps=1, window=100.0,
                            memory=False, attention=False, progress=False)
    assert result["sizes"][0]["psnr"] > 80


def test_an_adapter_is_installed_with_load(tmp_path):
    from clear_adapters.testing import write_reference_checkpoint

    pipe = tiny_flux_pipeline()
    adapter = write_reference_checkpoint(tmp_path / "a.safetensors", pipe.transformer, window_size=2)
    result = bench_pipeline(pipe=pipe, source=None, sizes=[32], steps=1, adapter=str(adapter), memory=False,
                            attention=False, progress=False)
    assert result["installed_with"] == "load" and result["window"] == 2


@pytest.mark.parametrize("sizes, message", [([30], "not multiples"), ([], "need sizes")])
def test_bad_requests_are_clear_errors_and_leave_the_pipeline_alone(sizes, message, capsys):
    pipe = tiny_flux_pipeline()
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(BenchInputError, match=message) as info:
        bench_pipeline(pipe=pipe, source=None, sizes=sizes, steps=1, progress=False)
    assert isinstance(info.value, ClearAdapterError)
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == \
        {k: type(v) for k, v in processors.items()}
    assert main(["bench", "pipeline", "--sizes", "30", "--steps", "1", "--no-progress"]) == 2
    assert "not multiples" in capsys.readouterr().err


def test_flux_dev_random_refuses_before_allocating_when_memory_is_short(monkeypatch):
    import torch

    from clear_adapters import random_flux
    from clear_adapters.errors import IncompatibleModelError
    from clear_adapters.pipelines import builtin_names

    assert "flux-dev-random" in builtin_names()
    monkeypatch.setattr(random_flux, "_free_bytes", lambda device: 1 << 30)
    with pytest.raises(IncompatibleModelError, match=r"22\.2 GiB .* 1\.0 GiB free"):
        random_flux.flux_dev_random_pipeline(device="cpu", dtype=torch.bfloat16)
