"""`clear-adapters matrix --pipeline tiny`: every case, the reports, the image grid and the exit code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clear_adapters import cli

REQUIRED_CASE_FIELDS = {"name", "plugin", "psnr", "ssim", "exact_at_full_window", "passed", "flop_fraction",
                        "time_ratio", "plugin_changes_output"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    script = shutil.which("clear-adapters", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "clear_adapters.cli"]
    start = time.perf_counter()
    result = subprocess.run(command + ["matrix", "--pipeline", "tiny", "--out", str(out)], capture_output=True,
                            text=True, timeout=600)
    seconds = time.perf_counter() - start
    return {"out": out, "result": result, "seconds": seconds,
            "report": json.loads((out / "matrix.json").read_text()) if (out / "matrix.json").is_file() else None}


def test_cli_runs_every_case_and_exits_zero(matrix):
    result = matrix["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert matrix["seconds"] < 180, matrix["seconds"]
    report = matrix["report"]
    names = [c["name"] for c in report["cases"]]
    for needed in ("lora", "controlnet", "ip_adapter", "kontext", "fill", "finetuned"):
        assert any(needed in n for n in names), (needed, names)
    assert "variant/finetuned-delta" in names and "variant/schnell" in names and "controlnet/union" in names
    assert report["passed"] and report["summary"]["failed"] == 0 and report["summary"]["skipped"] == 0
    assert {"pipeline", "adapter", "thresholds", "versions", "cases"} <= set(report)
    assert report["pipeline"] == "tiny" and report["window_size"] == 4
    assert {"min_psnr", "min_ssim", "exact_tolerance"} <= set(report["thresholds"])
    assert report["versions"]["torch"] and report["versions"]["diffusers"]


def test_every_case_meets_the_invariants(matrix):
    for case in matrix["report"]["cases"]:
        assert REQUIRED_CASE_FIELDS <= set(case), case["name"]
        assert case["passed"], (case["name"], case.get("failed_checks"), case.get("error"))
        assert case["exact_at_full_window"] and case["exact_max_difference"] <= 1e-5, case["name"]
        assert case["small_window_max_difference"] > 1e-4, case["name"]  # a small window changes the output
        assert case["plugin_changes_output"] is True, case["name"]  # plugin on vs off differs
        assert case["restored_max_difference"] <= 1e-5 and case["clear_kernel_calls"] > 0, case["name"]
        assert 0 < case["flop_fraction"] < 1 and case["time_ratio"] > 0, case["name"]
        assert case["psnr"] is None or case["psnr"] >= matrix["report"]["thresholds"]["min_psnr"]
    by_name = {c["name"]: c for c in matrix["report"]["cases"]}
    assert by_name["lora/clear-then-lora"]["extra"]["order_independent"]
    assert by_name["lora/fused"]["extra"]["fuse_unfuse_round_trip"]
    assert by_name["ip_adapter/ip-then-clear"]["extra"]["scale0_equals_no_ip"]
    assert by_name["ip_adapter/ip-then-clear"]["extra"]["unload_ip_keeps_clear"]
    assert by_name["variant/finetuned-delta"]["extra"]["delta_formula"]
    assert by_name["controlnet/canny"]["targets"] == ["transformer", "controlnet"]
    assert by_name["controlnet/dense-controlnet"]["targets"] == ["transformer"]
    # Kontext doubles the image tokens; the window spans both frames, so its fraction differs.
    assert by_name["variant/kontext"]["flop_fraction"] != by_name["variant/fill"]["flop_fraction"]


def test_markdown_and_html_reports(matrix):
    out, report = matrix["out"], matrix["report"]
    markdown = (out / "matrix.md").read_text()
    assert markdown.count("\n| ") == len(report["cases"]) + 1  # header + one row per case
    for case in report["cases"]:
        assert f"| {case['name']} | {case['plugin']} |" in markdown
    page = (out / "index.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert sources == [report["grid"]["file"]]
    grid = Image.open(out / sources[0])
    rows, columns = len(report["grid"]["rows"]), len(report["grid"]["columns"])
    assert rows == len(report["cases"]) and columns == 3
    cell_w, cell_h, gap = report["grid"]["cell_width"], report["grid"]["cell_height"], report["grid"]["gap"]
    assert grid.size == (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap)
    assert cell_w == cell_h == 128  # 64 px images shown at 2x


def test_exit_code_is_nonzero_when_a_case_fails(tmp_path, capsys):
    code = cli.main(["matrix", "--pipeline", "tiny", "--cases", "variant/fill", "--min-psnr", "1000",
                     "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "matrix.json").read_text())
    assert report["thresholds"]["min_psnr"] == 1000
    assert report["cases"][0]["failed_checks"] == ["psnr"]
    assert "FAIL variant/fill" in capsys.readouterr().out


def test_list_cases(capsys):
    assert cli.main(["matrix", "--list"]) == 0
    out = capsys.readouterr().out
    assert "lora/clear-then-lora" in out and "controlnet/union" in out and "variant/kontext" in out
