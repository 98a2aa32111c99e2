"""`clear-adapters bench`: correctness gate, JSON contract, one load-proof speed floor, block efficiency.

No test here asserts a speed goal: a loaded machine halves any ratio. The goals are printed by
`clear-adapters bench` and recorded, with their conditions, in docs/PERFORMANCE.md."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from clear_adapters import ClearAdapterError, ClearConfig, Geometry
from clear_adapters.bench import BenchMismatchError, bench_attention, growth
from clear_adapters.cli import main
from clear_adapters.kernels import clear_attention
from clear_adapters.kernels.tiled import tiled_attention

ROOT = Path(__file__).resolve().parents[1]


def _last_json(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_attention_json_and_the_load_proof_floor(capsys):
    """The JSON contract, and the suite's one speed assertion: a load-proof floor, not a goal.

    Floor: the CPU kernel is faster than full-attention SDPA *at all* (best round of each, interleaved
    in one process) at 96x96 tokens + 16 text, r=8, 2 x 64 -- 44x fewer FLOPs. Why 1 and not a goal: a loaded
    machine slows the two kernels unequally (the tiled kernel runs many short parallel regions, each
    waiting for a descheduled worker) and was seen losing ~3x more than SDPA at a 1-minute load of 4-9
    on 2 cores; a kernel that is not faster than full attention at all is broken whatever the load.
    The speed goals (>= 15x at 160x160) live in `clear-adapters bench` and docs/PERFORMANCE.md.
    """
    code = main(["bench", "attention", "--tokens", "96x96", "--window", "8", "--text", "16", "--heads", "2",
                 "--head-dim", "64", "--repeats", "3", "--json"])
    assert code == 0
    result = _last_json(capsys)
    assert result["default_backend"] == "tiled"
    assert result["max_abs_error"] <= 1e-4
    by = {r["backend"]: r for r in result["results"]}
    assert by["sdpa"]["attention_flops"] > by["tiled"]["attention_flops"]
    assert by["tiled"]["peak_extra_bytes"] > 0 and by["sdpa"]["peak_extra_bytes"] > 0
    assert {"device", "cpu", "cores", "threads", "torch", "load_1min"} <= set(result["conditions"])
    assert min(by["tiled"]["times_s"]) < min(by["sdpa"]["times_s"]), (by["tiled"]["times_s"], by["sdpa"]["times_s"])


def test_load_warning_names_load_and_cores():
    from clear_adapters.bench import load_warning

    assert load_warning({"cores": 2, "load_1min": 1.5}) is None
    warning = load_warning({"cores": 2, "load_1min": 1.5}, load_after=7.25)
    assert "7.2" in warning and "2 cores" in warning


def _window_off_by_one(q, k, v, geometry, config, weight):
    wrong = ClearConfig(config.window_size + 1, config.down_factor)
    return clear_attention(q, k, v, geometry, wrong, backend="tiled", spatial_weight=weight)


def _nan_backend(q, k, v, geometry, config, weight):
    out = clear_attention(q, k, v, geometry, config, backend="tiled", spatial_weight=weight)
    return out.index_fill(2, torch.tensor([geometry.total_len - 1]), float("nan"))


@pytest.mark.parametrize("broken", [_window_off_by_one, _nan_backend])
def test_wrong_backend_fails_loudly(broken):
    with pytest.raises(BenchMismatchError, match="'candidate'") as info:
        bench_attention((24, 20), 4, text=8, heads=2, head_dim=16, repeats=1, memory=False,
                        extra_backends={"candidate": broken})
    assert isinstance(info.value, ClearAdapterError)  # the CLI turns it into exit code 2
    assert "dense reference" in str(info.value)


def test_correct_extra_backend_is_timed_and_checked():
    def candidate(q, k, v, geometry, config, weight):
        return clear_attention(q, k, v, geometry, config, backend="dense", spatial_weight=weight)

    result = bench_attention((12, 16), 3, text=4, heads=2, head_dim=16, down=2, repeats=1, memory=False,
                             extra_backends={"candidate": candidate})
    by = {r["backend"]: r for r in result["results"]}
    assert by["candidate"]["max_abs_error"] <= 1e-5 and by["candidate"]["median_s"] > 0


def test_cli_exits_non_zero_when_the_check_fails(capsys):
    code = main(["bench", "attention", "--tokens", "16x16", "--window", "4", "--text", "4", "--heads", "2",
                 "--head-dim", "16", "--repeats", "1", "--no-memory", "--tolerance", "1e-30"])
    assert code == 2
    assert "differs from the dense reference" in capsys.readouterr().err


def test_blocks_efficiency_tile_vs_row(capsys):
    code = main(["bench", "blocks", "--tokens", "256x256", "--window", "16", "--text", "512", "--block", "128",
                 "--order", "tile", "--json"])
    assert code == 0
    result = _last_json(capsys)
    assert result["efficiency"] >= 0.55
    assert result["row_efficiency"] < result["efficiency"]
    assert main(["bench", "blocks", "--tokens", "256x256", "--window", "16", "--text", "512", "--order", "row",
                 "--json"]) == 0
    assert _last_json(capsys)["efficiency"] == pytest.approx(result["row_efficiency"])


@pytest.mark.usefixtures("single_thread")
def test_sweep_writes_json_and_log_log_png(tmp_path, capsys):
    from PIL import Image

    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["bench", "attention", "--sweep", "12x12,24x24", "--window", "4", "--text", "4", "--heads", "2",
                 "--head-dim", "16", "--repeats", "1", "--out", str(out), "--plot", str(plot)])
    assert code == 0
    sweep = json.loads(out.read_text())
    assert [p["tokens"] for p in sweep["points"]] == [148, 580]
    assert Image.open(plot).size[0] > 100
    g = growth(sweep, "tiled", (12, 12), (24, 24))
    assert g["tokens"] == pytest.approx(580 / 148) and g["time"] > 0 and g["memory"] > 0
    assert "sweep.png" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(6))
def test_cpu_fast_path_and_gather_path_equal_dense(seed):
    """The bench times the strips path; both tiled methods must equal the reference in any layout."""
    rng = random.Random(seed)
    down = rng.choice([1, 2, 4])
    h, w = max(down, rng.randint(1, 30) // down * down), max(down, rng.randint(1, 30) // down * down)
    geometry = Geometry.from_grid(h, w, rng.choice([0, 5]), frames=rng.choice([1, 2]))
    config = ClearConfig(rng.choice([1, 2.5, 5, 16]), down)
    batch, heads = rng.choice([1, 2]), rng.choice([1, 3])
    shape = (batch, geometry.total_len, heads, 8)
    q, k, v = (torch.randn(shape).transpose(1, 2) if rng.random() < 0.5 else torch.randn(shape).permute(0, 2, 1, 3)
               .contiguous() for _ in range(3))
    weight = torch.rand(1, 1, 1, down, 1, down, 1) if down > 1 else None
    ref, ref_lse = clear_attention(q, k, v, geometry, config, backend="dense", spatial_weight=weight,
                                   return_lse=True)
    scale = config.softmax_scale(8, geometry.total_len)
    for method in ("strips", "gather"):
        out, lse = tiled_attention(q, k, v, geometry, config, scale=scale, spatial_weight=weight, return_lse=True,
                                   method=method, tile_shape=rng.choice([None, (2, 3), (4, 8)]))
        assert (out - ref).abs().max() <= 1e-5, method
        assert (lse - ref_lse).abs().max() <= 1e-4, method


def _gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "examples" / "gpu_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("single_thread")  # tiny shapes: a second thread only contends
def test_gpu_benchmark_small_mode_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "small.json"
    assert _gpu_benchmark().main(["--small", "--device", "cpu", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["attention"]) == 2 and len(result["pipeline"]["sizes"]) == 2
    for point in result["attention"]:
        assert {r["backend"] for r in point["results"]} >= {"sdpa", "flex", "flex-row"}
        assert point["max_abs_error"] <= 1e-4
    assert result["pipeline"]["check_relative_error"] <= 1e-3
    assert result["pipeline"]["pipeline"] == "flux-dev-random"
    assert all(p["step_s_clear"] > 0 and p["attention_max_abs_error"] <= 1e-4 for p in result["pipeline"]["sizes"])
    assert "summary" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_benchmark_skips_cleanly_without_cuda(tmp_path, capsys):
    assert _gpu_benchmark().main(["--out", str(tmp_path / "r.json")]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("budget", [1, 8000, 1 << 23])  # strips per batch: 1, 2, all
def test_strips_batched_in_any_size_equal_dense(budget, monkeypatch):
    """Neighbouring strips share one copy and one call per run of tiles; split into batches of any size
    (one strip, a few, all) the result is the same, including Kontext-style grids of two sizes."""
    from clear_adapters.kernels import tiled

    monkeypatch.setattr(tiled, "STRIP_BATCH_ELEMENTS", budget)
    frames = torch.cat([torch.zeros(12 * 25), torch.ones(6 * 8)])
    rows = torch.cat([torch.arange(12).repeat_interleave(25), torch.arange(6).repeat_interleave(8) + 3])
    cols = torch.cat([torch.arange(25).repeat(12), torch.arange(8).repeat(6) + 5])
    geometry = Geometry.from_ids(torch.stack([frames, rows, cols], 1), text_len=6)
    config = ClearConfig(3.5, 1)
    q, k, v = (torch.randn(2, geometry.total_len, 2, 8).transpose(1, 2) for _ in range(3))
    ref, ref_lse = clear_attention(q, k, v, geometry, config, backend="dense", return_lse=True)
    plan = tiled.build_strip_plan(geometry, config, (2, 3))
    assert any(count > 1 for _, count in plan.runs)
    out, lse = tiled_attention(q, k, v, geometry, config, scale=config.softmax_scale(8, geometry.total_len),
                               return_lse=True, method="strips", tile_shape=(2, 3))
    assert (out - ref).abs().max() <= 1e-5 and (lse - ref_lse).abs().max() <= 1e-4
