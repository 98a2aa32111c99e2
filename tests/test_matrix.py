"""`clear-adapters matrix --pipeline tiny`: every case, the reports, the image grid and the exit code."""

from __future__ import annotations

import html
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
                        "speedup", "plugin_changes_output", "images"}


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
        assert 0 < case["flop_fraction"] < 1 and case["speedup"] > 0, case["name"]
        assert case["speedup"] == pytest.approx(case["time_full_s"] / case["time_clear_s"]), case["name"]
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
    assert "speedup" in markdown and "PSNR ≥ 30 dB" in markdown and str(out) not in markdown
    page = (out / "index.html").read_text()
    assert str(out) not in page and "/tmp" not in page  # relative paths only
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(not s.startswith(("/", "file:")) and (out / s).is_file() for s in sources)
    by_name = {c["name"]: c for c in report["cases"]}
    for name, labels in (("controlnet/canny", ["ControlNet condition (Canny edges)"]),
                         ("controlnet/multi", ["ControlNet condition (Canny edges) 1",
                                               "ControlNet condition (Canny edges) 2"]),
                         ("ip_adapter/ip-then-clear", ["IP-Adapter image"]),
                         ("variant/kontext", ["Kontext reference image"]),
                         ("variant/fill", ["image to fill", "Fill mask (white: repainted)"]),
                         ("lora/fused", [])):
        assert [i["label"] for i in by_name[name]["images"]["inputs"]] == labels, name
    for case in report["cases"]:
        images = case["images"]
        assert {"full", "clear", "difference"} <= set(images), case["name"]
        for key in ("full", "clear", "difference"):
            assert Image.open(out / images[key]).size == (64, 64)
        assert f"× {case['difference_gain']:.3g}" in page


def _browser() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if (path := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium/Chrome installed (CI installs one with apt)")
def test_html_report_renders_in_a_browser_with_every_image(matrix, tmp_path):
    """The page as a person sees it: headless Chromium loads it from disk; each case is one labelled row
    and every image decodes (naturalWidth > 0)."""
    out, report = matrix["out"], matrix["report"]
    probe = """<script>window.addEventListener("load", () => {
      const images = [...document.images];
      const rows = [...document.querySelectorAll("table.cases > tbody > tr")];
      document.body.dataset.result = JSON.stringify({
        images: images.length, loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
        rows: rows.map(r => ({id: r.id, name: r.querySelector(".case-name").textContent,
                              captions: [...r.querySelectorAll("figcaption")].map(c => c.textContent),
                              checks: r.querySelectorAll("ul.checks li").length}))});
    });</script></body>"""
    page = out / "browser-check.html"  # beside index.html: the same relative image paths
    page.write_text((out / "index.html").read_text().replace("</body>", probe))
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
               page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-result="([^"]*)"', result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["images"] > 3 * len(report["cases"]) and seen["loaded"] == seen["images"], seen
    assert [r["name"] for r in seen["rows"]] == [c["name"] for c in report["cases"]]
    for row, case in zip(seen["rows"], report["cases"]):
        assert row["captions"][-3:-1] == ["full attention", "CLEAR"] and row["captions"][-1].startswith("|CLEAR")
        assert row["checks"] == len(case["checks"])


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
