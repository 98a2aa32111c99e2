"""The distillation report: ``report.json`` and ``loss.png`` (drawn with PIL; matplotlib is not a dependency)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

REPORT_NAME = "report.json"
PLOT_NAME = "loss.png"
#: loss terms in the history, in drawing order, with their colours
SERIES = (("total", (20, 20, 20)), ("fm", (31, 119, 180)), ("pred", (214, 39, 40)), ("attn", (44, 160, 44)))


def write_report(directory: str | Path, report: dict) -> Path:
    path = Path(directory) / REPORT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def draw_loss_plot(history: list[dict], path: str | Path, *, title: str = "", labels: dict | None = None,
                   size=(720, 420)) -> Path:
    """Loss terms against step on a log scale (raw values faint, a moving average on top) as a PNG.

    ``history``: ``[{"step": int, "total": float, "fm": float, "pred": float, "attn": float}, ...]``;
    missing, zero or non-finite values are left out. ``labels`` renames terms in the legend.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 34, 46
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill="black", font=font)
    series = []
    for name, colour in SERIES:
        points = [(h["step"], h[name]) for h in history if h.get(name) is not None and h[name] > 0
                  and math.isfinite(h[name])]
        if points:
            series.append((name, colour, points))
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if not series:
        draw.text((x0 + 10, y0 + 10), "no loss recorded", fill="black", font=font)
        image.save(path)
        return Path(path)
    steps = [s for _, _, pts in series for s, _ in pts]
    logs = [math.log10(v) for _, _, pts in series for _, v in pts]
    smin, smax = min(steps), max(max(steps), min(steps) + 1)
    lmin, lmax = min(logs), max(logs)
    if lmax - lmin < 0.5:
        lmin, lmax = lmin - 0.25, lmax + 0.25

    def to_xy(step, value):
        x = x0 + (step - smin) / (smax - smin) * (x1 - x0)
        y = y1 - (math.log10(value) - lmin) / (lmax - lmin) * (y1 - y0)
        return x, y

    for tick in _nice_ticks(lmin, lmax):
        _, y = to_xy(smin, 10 ** tick)
        draw.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        draw.text((6, y - 6), f"{10 ** tick:.0e}", fill=(80, 80, 80), font=font)
    for tick in _nice_ticks(smin, smax):
        x, _ = to_xy(tick, 10 ** lmin)
        draw.line([(x, y1), (x, y1 + 4)], fill=(120, 120, 120))
        draw.text((x - 8, y1 + 8), f"{tick:g}", fill=(80, 80, 80), font=font)
    draw.text(((x0 + x1) // 2 - 12, height - 16), "step", fill="black", font=font)
    window = max(1, len(history) // 20)
    for name, colour, points in series:
        faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
        raw = [to_xy(s, v) for s, v in points]
        smooth = [to_xy(s, v) for (s, _), v in zip(points, _smooth([v for _, v in points], window))]
        for line, fill, w in ((raw, faint, 1), (smooth, colour, 2)):
            if len(line) > 1:
                draw.line(line, fill=fill, width=w)
            else:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=fill)
    for i, (name, colour, _) in enumerate(series):  # legend, top right
        lx, ly = x1 - 110, y0 + 8 + 14 * i
        draw.line([(lx, ly + 6), (lx + 18, ly + 6)], fill=colour, width=2)
        draw.text((lx + 24, ly), (labels or {}).get(name, name), fill="black", font=font)
    image.save(path)
    return Path(path)
