"""The integration registration mechanism, the layering rule and the real-pipeline code path of the matrix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from clear_adapters import compat
from clear_adapters.compat import Case, CaseSetup, CaseSkipped, MatrixContext


def test_discover_cases_collects_every_integration():
    cases = compat.discover_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    plugins = {c.plugin for c in cases}
    assert {"lora", "controlnet", "ip_adapter", "kontext", "fill", "finetuned", "schnell", "img2img"} <= plugins
    modules = {type(c.prepare).__module__ if not callable(c.prepare) else c.prepare.__module__ for c in cases}
    assert {f"clear_adapters.integrations.{m}" for m in ("lora", "controlnet", "ip_adapter", "variants")} <= modules


def test_register_case_adds_an_outside_case(monkeypatch):
    monkeypatch.setattr(compat, "_EXTRA_CASES", [])
    case = Case("thirdparty/demo", "thirdparty", "a case from outside the package", lambda ctx: None)
    assert compat.register_case(case) is case
    assert compat.discover_cases()[-1] is case
    with pytest.raises(ValueError, match="already registered"):
        compat.register_case(case)
    with pytest.raises(TypeError):
        compat.register_case("not a case")
    monkeypatch.setattr(compat, "_EXTRA_CASES", [case, Case("lora/fused", "lora", "clash", lambda ctx: None)])
    with pytest.raises(ValueError, match="duplicate case names: lora/fused"):
        compat.discover_cases()


def test_select_cases_by_name_plugin_prefix_and_glob():
    cases = compat.discover_cases()
    assert {c.name for c in compat.select_cases(cases, ["lora"])} == {c.name for c in cases if c.plugin == "lora"}
    assert [c.name for c in compat.select_cases(cases, ["variant/fill"])] == ["variant/fill"]
    assert {c.plugin for c in compat.select_cases(cases, ["variant"])} >= {"kontext", "fill", "finetuned"}
    assert len(compat.select_cases(cases, ["controlnet/*", "kontext"])) == 5
    with pytest.raises(ValueError, match="no case matches"):
        compat.select_cases(cases, ["nope"])


def test_core_modules_do_not_import_integrations():
    code = ("import sys, clear_adapters, clear_adapters.api, clear_adapters.processors, clear_adapters.weights, "
            "clear_adapters.kernels, clear_adapters.testing, clear_adapters.cli\n"
            "clear_adapters.cli.build_parser()\n"
            "print([m for m in sys.modules if m.startswith('clear_adapters.integrations')\n"
            "       or m == 'clear_adapters.compat'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_real_pipeline_cases_skip_with_the_option_they_need(tmp_path):
    # No model is loaded: every case checks its resources before touching the (remote) base pipeline.
    ctx = MatrixContext(pipeline="black-forest-labs/FLUX.1-dev", workdir=tmp_path)
    ctx.base_pipeline = lambda: pytest.fail("a case loaded the base pipeline before checking its resources")
    reasons = {}
    for case in compat.discover_cases():
        if case.name == "variant/img2img":
            continue  # needs nothing but the pipeline itself
        with pytest.raises(CaseSkipped) as info:
            case.prepare(ctx)
        reasons[case.name] = str(info.value)
    assert reasons["lora/two-adapters"].startswith("needs --lora PATH")
    assert reasons["controlnet/union"].startswith("needs --controlnet-union ID")
    assert reasons["ip_adapter/ip-then-clear"].startswith("needs --ip-adapter")
    assert reasons["variant/kontext"].startswith("needs --kontext ID")
    assert reasons["variant/finetuned-delta"].startswith("needs --variant ID")


def test_real_code_path_runs_given_resources_and_reports_skips(tmp_path, monkeypatch, single_thread):
    """`--pipeline <id>` with a stand-in for from_pretrained: LoRA given, the rest reported as skipped."""
    from clear_adapters.testing import tiny_flux_pipeline, tiny_flux_transformer, write_reference_checkpoint, \
        write_tiny_lora

    base = tiny_flux_pipeline(0)
    monkeypatch.setattr(MatrixContext, "base_pipeline", lambda self: base)
    adapter = write_reference_checkpoint(tmp_path / "adapter.safetensors", tiny_flux_transformer(0), 4)
    lora = write_tiny_lora(tmp_path / "lora", tiny_flux_transformer(0), seed=5)
    report = compat.run_matrix("someone/flux-like", str(adapter), out=tmp_path / "out",
                               cases=["lora/lora-then-clear", "lora/fused", "variant/img2img", "variant/kontext"],
                               height=64, width=64, steps=2, max_sequence_length=32, resources={"lora": [str(lora)]},
                               thresholds={"min_psnr": 20, "min_ssim": 0.5}, printer=None)
    status = {c["name"]: c["status"] for c in report["cases"]}
    assert status == {"lora/lora-then-clear": "ok", "lora/fused": "ok", "variant/img2img": "ok",
                      "variant/kontext": "skipped"}, report["cases"]
    assert report["passed"] and report["summary"]["skipped"] == 1
    # The shared real pipeline is left as it was found: no LoRA, no CLEAR.
    assert not base.get_list_adapters() or not any(base.get_list_adapters().values())
    from clear_adapters import api

    assert api.get_handle(base) is None
    md = (tmp_path / "out" / "matrix.md").read_text()
    assert "skipped: needs --kontext ID" in md
    saved = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert saved["thresholds"]["min_psnr"] == 20 and saved["pipeline"] == "someone/flux-like"


def test_a_failing_case_is_reported_not_raised(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("plugin exploded")

    def no_effect(ctx):
        from clear_adapters.testing import tiny_flux_pipeline

        return CaseSetup(tiny_flux_pipeline(0), {}, off=lambda generate: generate())  # "off" changes nothing

    monkeypatch.setattr(compat, "_EXTRA_CASES", [Case("x/broken", "x", "raises", broken),
                                                 Case("x/no-effect", "x", "plugin without effect", no_effect)])
    report = compat.run_matrix("tiny", out=tmp_path, cases=["x/*"], printer=None)
    broken_entry, no_effect_entry = report["cases"]
    assert broken_entry["status"] == "error" and "plugin exploded" in broken_entry["error"]
    assert no_effect_entry["passed"] is False
    assert no_effect_entry["failed_checks"] == ["plugin_changes_output", "plugin_changes_output_with_clear"]
    assert not report["passed"]


def test_canny_torch_finds_edges_and_matches_opencv_when_installed():
    import numpy as np

    from clear_adapters.integrations.controlnet import canny, canny_torch
    from clear_adapters.testing import tiny_test_image

    image = tiny_test_image(128)
    gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))
    edges = canny_torch(gray)
    assert 0.02 < edges.float().mean() < 0.3  # outlines, not noise and not empty
    flat = canny_torch(torch.full((32, 32), 80.0))
    assert not flat.any()
    rgb = canny(image)
    assert rgb.size == image.size and rgb.mode == "RGB"
    try:
        import cv2
    except ImportError:
        return
    reference = torch.from_numpy(cv2.Canny(np.asarray(image.convert("L")), 100, 200) > 0)
    agreement = (reference == edges).float().mean()
    assert agreement > 0.97, float(agreement)


def test_real_code_path_from_local_directories(tmp_path, single_thread):
    """`clear-adapters matrix --pipeline DIR` with every plugin given as a local directory: from_pretrained,
    load_lora_weights, load_ip_adapter with an encoder path, ControlNets and variant pipelines, delta base."""
    from diffusers import FluxControlNetModel, FluxKontextPipeline

    from clear_adapters import cli
    from clear_adapters.integrations.controlnet import union_controlnet
    from clear_adapters.testing import (randomize_controlnet_outputs, tiny_finetuned_transformer,
                                        tiny_flux_fill_pipeline, tiny_flux_pipeline, tiny_flux_transformer,
                                        tiny_image_encoder, write_reference_checkpoint, write_tiny_ip_adapter,
                                        write_tiny_lora)

    base = tiny_flux_pipeline(0)
    base.save_pretrained(tmp_path / "base")
    tiny_flux_pipeline(0, guidance_embeds=False).save_pretrained(tmp_path / "schnell")
    tiny_flux_fill_pipeline(0).save_pretrained(tmp_path / "fill")
    variant = tiny_flux_pipeline(0)
    variant.register_modules(transformer=tiny_finetuned_transformer(variant.transformer, seed=9))
    variant.save_pretrained(tmp_path / "variant")
    transformer = tiny_flux_transformer(0)
    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2)
    randomize_controlnet_outputs(net, seed=1).save_pretrained(tmp_path / "controlnet")
    union = union_controlnet(transformer, num_mode=3, num_layers=1, num_single_layers=1)
    randomize_controlnet_outputs(union, seed=2).save_pretrained(tmp_path / "union")
    tiny_image_encoder()[0].save_pretrained(tmp_path / "encoder")
    ip = write_tiny_ip_adapter(tmp_path / "ip" / "ip_adapter.safetensors", transformer)
    adapter = write_reference_checkpoint(tmp_path / "clear.safetensors", transformer, 4)
    lora_a = write_tiny_lora(tmp_path / "lora_a", transformer, seed=1)
    lora_b = write_tiny_lora(tmp_path / "lora_b", transformer, seed=2)
    assert FluxKontextPipeline  # Kontext is left out on purpose: it must be reported as skipped

    out = tmp_path / "out"
    code = cli.main([
        "matrix", "--pipeline", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(out),
        "--height", "64", "--width", "64", "--steps", "2", "--max-sequence-length", "32", "--device", "cpu",
        "--dtype", "float32", "--min-psnr", "30", "--min-ssim", "0.95",
        "--lora", str(lora_a), "--lora", str(lora_b), "--controlnet", str(tmp_path / "controlnet"),
        "--controlnet-union", str(tmp_path / "union"), "--ip-adapter", str(ip), "--image-encoder",
        str(tmp_path / "encoder"), "--fill", str(tmp_path / "fill"), "--schnell", str(tmp_path / "schnell"),
        "--variant", str(tmp_path / "variant"), "--base", str(tmp_path / "base")])
    report = json.loads((out / "matrix.json").read_text())
    problems = {c["name"]: c.get("failed_checks") or c.get("error") for c in report["cases"]
                if c["status"] != "skipped" and not c["passed"]}
    assert code == 0 and not problems, problems
    status = {c["name"]: c["status"] for c in report["cases"]}
    assert status.pop("variant/kontext") == "skipped"
    assert set(status.values()) == {"ok"} and len(status) == 15
    assert "needs --kontext ID" in (out / "matrix.md").read_text()
