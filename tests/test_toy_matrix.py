"""The compatibility matrix and the demo on the shipped toy: zero-shot transfer of the distilled adapter
to the toy's trained plugins, measured (no retraining; one matrix run shared by the tests).

Acceptance lines checked here: the fine-tuned variant in delta mode is at most 0.5 dB below replace mode
and both are >= 4 dB above the zero-shot pattern; with the LoRA and the ControlNet, CLEAR+plugin vs
full+plugin is within 3 dB of the plugin-free comparison and keeps >= 90% of the plugin's effect on the
detector's score; the matrix and the demo default to the toy. Two of those lines are not met by the
shipped toy: they are strict xfails with the measured numbers (an unexpected pass turns them red).
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def toy_matrix(tmp_path_factory):
    from clear_adapters.compat import run_matrix

    out = tmp_path_factory.mktemp("toy_matrix")
    report = run_matrix("toy", None, out=out)  # the defaults of `clear-adapters matrix`: toy/* cases, toy/r4
    return out, report, {e["name"]: e for e in report["cases"]}


def test_cli_defaults_are_the_toy():
    from clear_adapters.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["matrix"]).pipeline == "toy"
    assert parser.parse_args(["demo"]).pipeline == "toy"
    assert parser.parse_args(["demo", "--pipeline", "tiny"]).pipeline == "tiny"


def test_toy_matrix_runs_every_case_and_writes_its_thresholds(toy_matrix):
    out, report, cases = toy_matrix
    assert report["pipeline"] == "toy" and report["adapter"] == "toy" and report["window_size"] == 4
    expected = {"toy/base", "toy/lora", "toy/controlnet", "toy/variant", "toy/variant-delta"}
    assert set(cases) == expected and all(e["status"] == "ok" for e in cases.values())
    for name in ("toy/base", "toy/variant", "toy/variant-delta"):
        assert cases[name]["passed"], (name, cases[name]["failed_checks"])
    # The two plugin cases fail lines of their own (see the xfail tests below); nothing else fails there.
    assert set(cases["toy/lora"]["failed_checks"]) <= {"psnr_near_plugin_free", "gain_over_zero_shot"}
    assert set(cases["toy/controlnet"]["failed_checks"]) <= {"plugin_effect_kept", "task_kept"}
    assert report["passed"] is (not any(e["failed_checks"] for e in cases.values()))
    for key in ("min_psnr", "min_gain_over_zero_shot_db", "max_task_drop", "min_effect_ratio",
                "max_psnr_drop_vs_plugin_free_db", "max_delta_deficit_vs_replace_db"):
        assert key in report["thresholds"], key
    assert cases["toy/base"]["thresholds"] == {"min_psnr": 17.0, "min_gain_over_zero_shot_db": 5.0}
    for e in cases.values():  # every case scores its task on full, CLEAR and zero-shot outputs
        assert {"full", "clear", "zero_shot"} <= set(e["task"]) and e["prompts"] >= 8
        assert e["zero_shot_psnr"] is not None and e["gain_over_zero_shot_db"] == pytest.approx(
            e["psnr"] - e["zero_shot_psnr"])
    table = (out / "matrix.md").read_text()
    assert "zero-shot PSNR (dB)" in table and "task full / CLEAR / zero-shot" in table
    assert json.loads((out / "matrix.json").read_text())["passed"] == report["passed"]


def test_variant_delta_mode_keeps_up_with_replace_and_beats_the_bare_pattern(toy_matrix):
    _, report, cases = toy_matrix
    replace, delta = cases["toy/variant"], cases["toy/variant-delta"]
    assert delta["psnr"] >= replace["psnr"] - 0.5, (delta["psnr"], replace["psnr"])
    for e in (replace, delta):
        assert e["gain_over_zero_shot_db"] >= 4.0, (e["name"], e["psnr"], e["zero_shot_psnr"])
    assert delta["checks"]["psnr_within_0.5db_of_toy/variant"]


NOT_MET = "acceptance line not met by the shipped toy (docs/TOY.md, 'Open'): "


@pytest.mark.parametrize("name", [
    pytest.param("toy/lora", marks=pytest.mark.xfail(strict=True, reason=NOT_MET + "CLEAR+LoRA vs full+LoRA "
                                                     "23.8 dB, 5.6 dB below the plugin-free 29.3 dB")),
    "toy/controlnet"])
def test_plugin_case_psnr_within_3_db_of_the_plugin_free_case(toy_matrix, name):
    e = toy_matrix[2][name]
    assert e["plugin_free_psnr"] - e["psnr"] <= 3.0, (e["psnr"], e["plugin_free_psnr"])


@pytest.mark.parametrize("name", [
    "toy/lora",
    pytest.param("toy/controlnet", marks=pytest.mark.xfail(strict=True, reason=NOT_MET + "the ControlNet's effect "
                                                           "on mask IoU under CLEAR is 0.74 of full attention's"))])
def test_plugin_effect_kept_under_clear(toy_matrix, name):
    task = toy_matrix[2][name]["task"]
    assert task["effect_full"] > 0.2, task  # the plugin does something the detector sees
    assert task["effect_clear"] >= 0.9 * task["effect_full"], task


def test_the_report_shows_zero_shot_images_and_inputs(toy_matrix):
    out, _, cases = toy_matrix
    e = cases["toy/controlnet"]
    assert (out / e["images"]["zero_shot"]).is_file() and e["images"]["inputs"]
    html = (out / "index.html").read_text()
    assert "CLEAR zero-shot" in html


def test_toy_demo_writes_a_captioned_grid(tmp_path):
    from PIL import Image

    from clear_adapters.toy.demo import COLUMNS, run_toy_demo

    lines = []
    out = tmp_path / "demo.png"
    rows = run_toy_demo(out, ["a red circle in the top left", "three blue squares"], printer=lines.append,
                        progress=False)
    assert len(rows) == 2 and all(r["psnr_distilled_db"] > r["psnr_zero_shot_db"] for r in rows)
    text = "\n".join(lines)
    assert "PSNR vs full attention" in text and "attention FLOPs" in text
    image = Image.open(out).convert("RGB")
    assert image.width >= len(COLUMNS) * 128 and image.height >= 2 * 128
    # no empty block: each of the 2 x 4 panels has visible content (the difference panel is scaled up)
    import numpy as np

    pixels = np.asarray(image).astype(float)
    top = 2 * 16 + 4 + 16  # title, column headers, the first row's caption
    for column in range(len(COLUMNS)):
        left = 6 + column * (128 + 6)
        panel = pixels[top:top + 128, left:left + 128]
        assert panel.std() > 2.0, column
