"""Multi-process CLEAR: halo mode and xDiT (Ulysses, ring) against single-process CLEAR, on 2 gloo ranks.

Two ``tests/parallel_worker.py`` processes start once for the whole module and check many cases (see
that file); they write their findings as JSON and the assertions live here. xfuser runs
on this CPU-only machine through the harness in ``tests/xfuser_cpu.py``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clear_adapters.integrations import _parallel as parallel
from clear_adapters.integrations import xdit
from clear_adapters.integrations._parallel import ParallelError, bytes_per_layer, halo_transfers, split_rows

WORKER = Path(__file__).with_name("parallel_worker.py")
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, ranks: int = 2, timeout_s: float = 300) -> list[dict]:
    """Start ``ranks`` worker processes; their results, or a failure with their logs. A hang fails too."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CLEAR_TEST_PG_TIMEOUT="60")
        log = open(tmp_path / f"log{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("workers hung:\n" + _logs(tmp_path, ranks))
    finally:
        for log in logs:
            log.close()
    results = []
    for rank in range(ranks):
        path = tmp_path / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no result:\n" + _logs(tmp_path, ranks))
        result = json.loads(path.read_text())
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        results.append(result)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The results of one start of 2 gloo worker processes (see tests/parallel_worker.py)."""
    return launch(tmp_path_factory.mktemp("two-ranks"))


def _logs(tmp_path, ranks) -> str:
    return "\n".join((tmp_path / f"log{r}.txt").read_text()[-4000:] for r in range(ranks))


# -------------------------------------------------------------------------------------- multi-process
def test_halo_two_ranks_equals_single_process(two_ranks):
    ranks = two_ranks
    for rank, result in enumerate(ranks):
        assert result["xfuser_during_halo"] is False  # halo runs on plain torch.distributed
        for case in result["halo_cases"]:
            assert case["shape_ok"], case
            assert case["max_diff"] <= TOLERANCE, case  # non-square, unaligned bands, d = 1 and d = 4, batch 2
            assert case["after_remove"] == 0.0, case
        assert {c["down"] for c in result["halo_cases"]} == {1, 4}
        assert result["halo_pipeline"]["max_diff"] <= TOLERANCE
        measured = result["halo_bytes"]
        assert measured["calls"] == measured["counted_calls"] == 4  # 2 double + 2 single blocks
        assert measured["counted"] == measured["measured"] == measured["formula"]
        errors = result["halo_errors"]
        assert "before halo.apply" in errors["no_clear"]
        assert "3 bands given for 2 ranks" in errors["bands_per_rank"]
        assert "ranks disagree" in errors["ranks_disagree"]
        assert errors["unchanged"]


def test_diffusers_context_parallelism_is_refused_on_clear(two_ranks):
    for result in two_ranks:
        cp_after, cp_before = result["diffusers_cp"]
        assert cp_after and "context parallelism" in cp_after and "not supported" in cp_after
        assert cp_before and "context parallelism" in cp_before


def test_a_rank_that_dies_is_a_clear_error_not_a_hang(two_ranks):
    dead = two_ranks[0]["dead_rank"]
    assert dead["error"] and "another rank died" in dead["error"]
    assert dead["seconds"] < 30  # an error, not a wait for the 60 s timeout


def test_xdit_ulysses_and_ring_equal_single_process(two_ranks):
    for result in two_ranks:
        for mode in ("ulysses", "ring"):
            cases = result[mode]["cases"]
            assert len(cases) == (3 if mode == "ulysses" else 2)
            for case in cases:
                assert case["max_diff"] <= TOLERANCE, (mode, case)
                assert case["window_effect"] > 1e-3, (mode, case)  # CLEAR differs from full attention here
                assert case["after_remove"] == 0.0, (mode, case)
                assert case["counted"] == case["measured"] == case["formula"], (mode, case)
            assert result[mode]["pipeline"] <= TOLERANCE
        assert "825 image tokens" in result["indivisible"] and "multiple of 2" in result["indivisible"]
        assert result["halo_on_xfuser_group"]["group_is_xfuser"]
        assert result["halo_on_xfuser_group"]["max_diff"] <= TOLERANCE
        assert "before xdit.apply" in result["xdit_errors"]["no_clear"]
        assert "ControlNet" in result["xdit_errors"]["controlnet"]
        assert result["xdit_errors"]["unchanged"]
        assert "down_factor > 1" in result["ring_pooled"]


# -------------------------------------------------------------------------------------- setup errors
def test_missing_rank_is_a_clear_error_within_the_timeout(monkeypatch):
    """WORLD_SIZE says 2, one process starts: the rendezvous fails after the timeout instead of hanging."""
    import time

    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    start = time.time()
    with pytest.raises(ParallelError, match=r"could not form a group of 2 processes within 2 s"):
        parallel.init_distributed("gloo", timeout_s=2)
    assert time.time() - start < 30
    assert not dist.is_initialized()


def test_outside_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelError, match="torchrun"):
        parallel.init_distributed("gloo")


def test_halo_apply_needs_a_process_group():
    from clear_adapters.integrations import halo

    with pytest.raises(ParallelError, match="not initialised"):
        halo.apply(object())


# -------------------------------------------------------------------------------------- plans, formulas
def test_bands_and_halo_transfers():
    assert split_rows(13, 2) == [(0, 7), (7, 13)]
    assert split_rows(16, 3, 4) == [(0, 8), (8, 12), (12, 16)]
    with pytest.raises(ParallelError, match="cannot be split"):
        split_rows(8, 3, 4)
    # bands shorter than the halo: rows come from two ranks away
    transfers = halo_transfers([(0, 2), (2, 4), (4, 10)], halo=3)
    assert (2, 0, 1, 2) in transfers and (2, 1, 2, 4) in transfers  # rank 2 needs rows 1..3 from ranks 0 and 1
    assert (0, 1, 2, 4) in transfers and (0, 2, 4, 5) in transfers  # rank 0 needs rows 2..4
    assert all(r0 < r1 and receiver != sender for receiver, sender, r0, r1 in transfers)
    assert halo_transfers([(0, 5), (5, 9)], halo=0) == []


def test_halo_sends_a_quarter_of_ulysses_or_less_at_4k():
    """Acceptance: 256 x 256 tokens, r = 16, 2 ranks (FLUX.1-dev shapes, bf16)."""
    flux = dict(height=256, width=256, text_len=512, heads=24, head_dim=128, window_size=16, element_size=2)
    halo_bytes = bytes_per_layer("halo", ranks=2, **flux)
    ulysses_bytes = bytes_per_layer("ulysses", ranks=2, **flux)
    assert halo_bytes <= ulysses_bytes / 4
    # halo: K and V of 15 rows x 256 columns x 3072 channels to one neighbour, plus the float32 text merge
    assert halo_bytes == 2 * 15 * 256 * 3072 * 2 + (512 * 3072 + 2 * 512 * 24) * 4
    assert ulysses_bytes == 4 * (512 + 65536) // 2 * 3072 * 2 // 2
    # halo does not grow with the image height; Ulysses does
    taller = dict(flux, height=512)
    assert bytes_per_layer("halo", ranks=2, **taller) == halo_bytes
    assert bytes_per_layer("ulysses", ranks=2, **taller) > 1.9 * ulysses_bytes


def test_xfuser_version_range_is_checked():
    xdit.check_xfuser_version("0.7.0")
    xdit.check_xfuser_version("0.7.5.post1")
    for bad in ("0.6.4", "0.8.0", "1.0"):
        with pytest.raises(xdit.XDiTVersionError, match=r"not supported.*>=0\.7\.0,<0\.8"):
            xdit.check_xfuser_version(bad)
    assert issubclass(xdit.XDiTVersionError, ImportError)  # the matrix's integration discovery skips it cleanly


def test_gpu_script_small_mode_runs_on_cpu(tmp_path):
    """examples/gpu_xdit.py's mechanics on tiny shapes: single, 1-rank halo and 1-rank xfuser agree."""
    out = tmp_path / "gpu_xdit.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(WORKER.parents[1] / "examples" / "gpu_xdit.py"), "--small", "--out",
                           str(out)], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert result["transformer"]["xfuser"]["attention_calls"] > 0
    assert set(result["tiny_float32"]) == {"halo", "xfuser"}
