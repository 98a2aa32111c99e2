"""Compatibility-matrix reports: ``matrix.md`` (what model cards embed) and ``index.html``.

Rendered from the Jinja2 templates in ``clear_adapters/templates``; :mod:`clear_adapters.compat`
runs the cases and hands over the report dict. Every path written into a report is relative to the
report's folder (images) or a bare file name (local adapters), so a report can be moved, published
or attached to an issue without showing anyone's directory layout.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path

IMAGES_DIR = "images"
#: Images smaller than this are shown enlarged (pixelated) in the HTML page.
MIN_CELL_PX = 128

#: Each check of a case in words, for the ✓/✗ lists ({placeholders} come from the case entry).
CHECK_TEXT = {
    "exact_at_full_window": "window covering the image = full attention (max diff {exact_max_difference:.1e})",
    "differs_at_small_window": "window r={small_window:g} changes the output (max diff "
                               "{small_window_max_difference:.1e})",
    "clear_active": "CLEAR's kernels ran ({clear_kernel_calls} calls)",
    "restored_after_unload": "unload restores the output (max diff {restored_max_difference:.1e})",
    "plugin_changes_output": "plugin changes the output (off: {off})",
    "plugin_changes_output_with_clear": "plugin still changes the output under CLEAR",
    "psnr": "PSNR vs full attention {psnr_text}",
    "ssim": "SSIM vs full attention {ssim:.3f}",
    "gain_over_zero_shot": "{gain_over_zero_shot_db:.2f} dB above the zero-shot pattern (same window, no weights)",
    "psnr_near_plugin_free": "PSNR within the allowed drop of the plugin-free run ({plugin_free_psnr:.2f} dB)",
    "task_kept": "{task_name} with CLEAR {task[clear]:.2f} vs full attention {task[full]:.2f}",
    "plugin_effect_kept": "the plugin's effect on {task_name} kept: x{task[effect_ratio]:.2f} of full attention's",
}


def write_case_images(out: str | Path, case_name: str, images: dict) -> dict:
    """Save a case's images as PNGs under ``out/images``; returns their paths relative to ``out``.

    ``images``: ``full``, ``clear``, ``difference`` (tensors or PIL images) and ``inputs``, a list of
    ``(label, image)``. Returns ``{"full": path, "clear": path, "difference": path,
    "inputs": [{"label": ..., "file": path}]}``.
    """
    from .imaging import to_pil

    folder = Path(out) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = _slug(case_name)
    paths: dict = {"inputs": []}
    for key in ("full", "clear", "zero_shot", "difference"):
        if images.get(key) is not None:
            to_pil(images[key]).save(folder / f"{stem}.{key}.png")
            paths[key] = f"{IMAGES_DIR}/{stem}.{key}.png"
    for i, (label, image) in enumerate(images.get("inputs") or []):
        name = f"{stem}.input{i + 1}.png"
        (image if hasattr(image, "save") else to_pil(image)).save(folder / name)
        paths["inputs"].append({"label": label, "file": f"{IMAGES_DIR}/{name}"})
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "case"


def write_reports(out: str | Path, report: dict) -> list[Path]:
    """Write ``matrix.md`` and ``index.html`` for ``report`` into ``out``; returns their paths."""
    out = Path(out)
    written = []
    for name, text in (("matrix.md", render_markdown(report, out)), ("index.html", render_html(report, out))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written


def render_markdown(report: dict, out: str | Path | None = None) -> str:
    """The matrix as a Markdown section (one row per case)."""
    return _template("matrix.md.jinja", autoescape=False).render(**_view(report, out, markdown=True))


def render_html(report: dict, out: str | Path | None = None) -> str:
    """A standalone page: the thresholds in words, then one row per case with its plugin inputs,
    labelled images (full | CLEAR | difference x gain), every check as ✓/✗ and its numbers."""
    return _template("matrix.html.jinja", autoescape=True).render(**_view(report, out, markdown=False))


def _template(name: str, *, autoescape: bool):
    import jinja2

    text = resources.files("clear_adapters").joinpath(f"templates/{name}").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=autoescape, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(text)


# ------------------------------------------------------------------------------------------------ view
def shown_source(source, out: str | Path | None = None) -> str:
    """A source as a report may show it: Hub ids and names as they are, local paths relative to the
    report (inside it) or by file name only."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.is_absolute() and not text.startswith((".", "~")):
        return text
    if out is not None:
        try:
            return path.resolve().relative_to(Path(out).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return path.name


def rules(report: dict) -> list[str]:
    """The pass conditions of a report, in words."""
    t = report["thresholds"]
    mechanics = report.get("mechanics", True)
    found = [f"a window covering the whole image reproduces full attention (largest pixel difference "
             f"≤ {t['exact_tolerance']:g})"] if mechanics else []
    found += [f"a small window (radius {t.get('small_window', 4):g} tokens) changes the output (> "
              f"{t.get('differs_tolerance', 1e-4):g})",
              "the plugin changes the output, with full attention and with CLEAR (on vs off)"]
    if mechanics:
        found.append(f"after unloading CLEAR the pipeline gives its full-attention output again "
                     f"(≤ {t['exact_tolerance']:g})")
    found.append(f"CLEAR vs full attention: PSNR ≥ {t['min_psnr']:g} dB and SSIM ≥ {t['min_ssim']:g} (cases may "
                 "ask more)")
    for key, text in (("min_gain_over_zero_shot_db", "PSNR at least {:g} dB above the zero-shot pattern (the same "
                                                     "window with no weights changed; cases may ask more)"),
                      ("max_task_drop", "the detector's task score with CLEAR at most {:g} below full attention's"),
                      ("min_effect_ratio", "the plugin's effect on the task score (on − off) with CLEAR at least "
                                           "{:g} × its effect with full attention"),
                      ("max_psnr_drop_vs_plugin_free_db", "PSNR at most {:g} dB below CLEAR vs full attention with "
                                                          "the plugin off"),
                      ("max_delta_deficit_vs_replace_db", "weight mode delta at most {:g} dB below replace")):
        if key in t:
            found.append(text.format(t[key]))
    return found


def _view(report: dict, out, *, markdown: bool) -> dict:
    versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()
                         if v and k not in ("platform", "cuda_device"))
    cell = MIN_CELL_PX
    if report.get("width") and report.get("height"):
        cell = max(MIN_CELL_PX, min(int(report["width"]), 512))
    cases = [_case_view(e, markdown) for e in report["cases"]]
    return {"pipeline": shown_source(report["pipeline"], out), "adapter": shown_source(report["adapter"], out),
            "window_size": report.get("window_size"), "width": report.get("width"), "height": report.get("height"),
            "steps": report.get("steps"), "seed": report.get("seed"), "device": report.get("device"),
            "dtype": report.get("dtype"), "hardware": report.get("hardware") or "unrecorded hardware",
            "summary": report["summary"], "rules": rules(report), "versions": versions, "cases": cases,
            "cell": cell}


def _case_view(e: dict, markdown: bool) -> dict:
    status = e.get("status", "ok")
    view = {"name": _md(e["name"]) if markdown else e["name"], "plugin": _md(e.get("plugin", "")) if markdown
            else e.get("plugin", ""), "description": e.get("description", ""), "notes": e.get("notes"),
            "anchor": _slug(e["name"]), "passed": bool(e.get("passed")),
            "status_class": {"ok": "pass" if e.get("passed") else "fail"}.get(status, status), "inputs": [],
            "panels": [], "checks": [], "numbers": [], "reason": ""}
    if status == "skipped":
        view.update(verdict="skipped", reason=e.get("reason", ""),
                    md=_md_row(result=f"skipped: {_md(e.get('reason', ''))}"))
        return view
    if status == "error":
        view.update(verdict="error", reason=e.get("error", ""), status_class="error",
                    md=_md_row(result=f"**error**: {_md(e.get('error', '')[:120])}"),
                    checks=[{"ok": False, "text": f"the case could not run: {e.get('error', '')}"}])
        return view
    images = e.get("images") or {}
    gain = e.get("difference_gain")
    view["inputs"] = list(images.get("inputs") or [])
    for key, label in (("full", "full attention"), ("clear", "CLEAR"), ("zero_shot", "CLEAR zero-shot"),
                       ("difference", f"|CLEAR − full| × {gain:.3g}" if gain else "|CLEAR − full|")):
        if images.get(key):
            view["panels"].append({"label": label, "file": images[key]})
    psnr = e.get("psnr")
    psnr_text = "∞ dB (identical)" if psnr is None else f"{psnr:.2f} dB"
    fields = {**e, "psnr_text": psnr_text, "off": e.get("off") or "plugin removed"}
    for key, ok in (e.get("checks") or {}).items():
        try:
            text = CHECK_TEXT[key].format(**fields)
        except (KeyError, ValueError, TypeError):
            text = key.replace("_", " ")
        view["checks"].append({"ok": bool(ok), "text": text})
    speedup = e.get("speedup")
    view["numbers"] = [("PSNR", psnr_text), ("SSIM", f"{e['ssim']:.3f}"),
                       ("attention FLOPs", _pct(e.get("flop_fraction")) + " of full"),
                       ("speedup", f"{speedup:.2f}×" if speedup else "—"),
                       ("time full / CLEAR", f"{e.get('time_full_s', 0):.2f} s / {e.get('time_clear_s', 0):.2f} s")]
    if e.get("zero_shot_psnr") is not None:
        view["numbers"].append(("zero-shot PSNR", f"{e['zero_shot_psnr']:.2f} dB"))
    if e.get("plugin_free_psnr") is not None:
        view["numbers"].append(("PSNR, plugin off", f"{e['plugin_free_psnr']:.2f} dB"))
    task = e.get("task")
    if task:
        name = e.get("task_name") or "task"
        view["numbers"].append((f"{name} full / CLEAR / zero-shot",
                                f"{task['full']:.2f} / {task['clear']:.2f} / {task['zero_shot']:.2f}"))
        if task.get("effect_ratio") is not None:
            view["numbers"].append((f"{name}: plugin effect CLEAR / full",
                                    f"{task['effect_clear']:.2f} / {task['effect_full']:.2f}"))
    if e.get("prompts", 1) > 1:
        view["numbers"].append(("prompts", f"{e['prompts']} (images: the first; numbers: means)"))
    for key, value in (e.get("extra") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            view["numbers"].append((key.replace("_", " "), f"{value:.4g}"))
    failed = e.get("failed_checks") or []
    view["verdict"] = "pass" if e.get("passed") else "FAIL: " + ", ".join(failed)
    effect = e.get("plugin_changes_output")
    if e.get("plugin_changes_output_with_clear") is not None:
        effect = e["plugin_changes_output_with_clear"] if effect is None else effect and \
            e["plugin_changes_output_with_clear"]
    zero = e.get("zero_shot_psnr")
    view["md"] = _md_row(psnr="inf" if psnr is None else f"{psnr:.2f}", ssim=f"{e['ssim']:.3f}",
                         zero_shot="inf" if zero is None else f"{zero:.2f}",
                         task=f"{task['full']:.2f} / {task['clear']:.2f} / {task['zero_shot']:.2f}" if task else "-",
                         flops=_pct(e.get("flop_fraction")), speedup=f"{speedup:.2f}" if speedup else "-",
                         effect=_yes_no(effect), exact=_yes_no(e.get("exact_at_full_window")),
                         result="pass" if e.get("passed") else f"**FAIL** ({', '.join(failed)})")
    return view


def _md_row(**cells) -> dict:
    return {"psnr": "", "ssim": "", "zero_shot": "", "task": "", "flops": "", "speedup": "", "effect": "", "exact": "",
            "result": "", **cells}


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _yes_no(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")
