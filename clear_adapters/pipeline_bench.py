"""What CLEAR does to a whole generation: full attention against CLEAR on one pipeline, per image size.

:func:`bench_pipeline` resolves the pipeline with :func:`clear_adapters.pipelines.load_pipeline`
(``tiny``, ``toy``, ``flux-dev-random``, a directory or a Hub id) and, for every size, generates the
same prompt and seed with full attention and with CLEAR installed — an adapter (``adapter=``) or,
without one, the bare window pattern (:func:`clear_adapters.attach`: same cost, no weights needed).

* A *step* is one transformer forward, timed by hooks on the transformer (synchronised on CUDA);
  ``step_s_*`` is the median over the steps of the timed generations, ``gen_s_*`` the median whole
  generation (text encoding, every step, VAE decode).
* ``attention_share``: the share of a full-attention step spent in the attention kernel itself
  (softmax(QK^T)V, what CLEAR replaces), estimated as layers x the time of one kernel call at the
  step's exact shapes, timed in isolation with :func:`clear_adapters.bench.bench_attention` (which
  also checks the CLEAR kernel against the dense reference); ``attention_share_clear`` likewise.
* ``peak_bytes``: the most memory tensors held during a one-step generation without VAE decode (text
  encoding and one step) beyond what was allocated before it (weights excluded), full and CLEAR; this
  untimed run is also the warm-up. The decode is the same in both modes and, with its quadratic
  mid-block attention, would hide the step's peak at high resolution.
* ``psnr``: CLEAR's image against full attention's, same seed. With ``attach`` (no adapter) or a
  random-weight pipeline it measures the pattern's effect, not an adapter's quality.

Rounds interleave the two modes (full at every size, then CLEAR at every size, ``repeats`` times),
so a change in machine load hits both alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import bench
from .errors import ClearAdapterError

DEFAULT_PROMPT = "a photo of a red house by the sea"
DEFAULT_WINDOW = 16.0


class BenchInputError(ClearAdapterError, ValueError):
    """A benchmark request that cannot be run as asked (size, steps, repeats)."""


class _StepTimer:
    """Times every forward of ``model`` and records the sequence it saw (hooks removed on close)."""

    def __init__(self, model, device: torch.device):
        self.device, self.times, self.shapes = device, [], []
        self._start = 0.0
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._after)]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        img_ids = kwargs.get("img_ids")
        grid = None
        if img_ids is not None and img_ids.ndim >= 2:
            ids = img_ids.reshape(-1, img_ids.shape[-1])
            grid = (int(ids[:, 1].max() - ids[:, 1].min()) + 1, int(ids[:, 2].max() - ids[:, 2].min()) + 1)
        self.shapes.append({"image_tokens": None if hidden is None else int(hidden.shape[1]),
                            "text_tokens": None if text is None else int(text.shape[1]), "grid": grid})
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def reset(self):
        self.times, self.shapes = [], []

    def close(self):
        for handle in self._handles:
            handle.remove()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bench_pipeline(source="tiny", sizes=(512, 1024), *, steps: int = 4, adapter: str | None = None,
                   window: float = DEFAULT_WINDOW, repeats: int = 1, device=None, dtype=None,
                   prompt: str = DEFAULT_PROMPT, seed: int = 0, memory: bool = True, attention: bool = True,
                   attention_repeats: int = 3, progress: bool = True, pipe=None) -> dict:
    """Full attention vs CLEAR on a whole pipeline, per square image size (pixels).

    Args:
        source: what :func:`~clear_adapters.pipelines.load_pipeline` resolves (ignored when ``pipe`` is given).
        sizes: image sides in pixels (multiples of the pipeline's pixels per latent token).
        steps: denoising steps per timed generation.
        adapter: installed with :func:`clear_adapters.load` (registry name, path, Hub id); without it
            :func:`clear_adapters.attach` installs the window pattern of radius ``window`` tokens.
        repeats: timed rounds (each: one generation per size and mode).
        device, dtype: default ``cuda``/bfloat16 when CUDA is available, else ``cpu``/float32.
        memory: measure peak memory in the warm-up generation (CPU: through the profiler).
        attention: time the attention kernel alone at each size (attention share, kernel speedup).
        pipe: an already built pipeline to measure instead of resolving ``source``.

    Returns a JSON-ready dict; ``sizes`` holds one entry per size with ``step_s_full``,
    ``step_s_clear``, ``speedup``, ``gen_s_full``, ``gen_s_clear``, ``attention_share``,
    ``peak_bytes`` (``{"full", "clear"}``) and ``psnr``, among others.
    """
    from tqdm.auto import tqdm

    from . import api
    from .imaging import psnr
    from .pipelines import load_pipeline
    from .weights import attention_layers

    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1 or steps < 1 or repeats < 1:
        raise BenchInputError(f"need sizes >= 1 px, steps >= 1 and repeats >= 1 (got {sizes}, {steps}, {repeats})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = bench.DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    conditions = bench.machine_conditions(device)
    if pipe is None:
        pipe = load_pipeline(source, device=str(device), dtype=dtype)

    def install():
        if adapter:
            return api.load(adapter, pipe)
        return api.attach(window, pipe)

    handle = install()  # validates the pipeline and the adapter before anything is timed
    api.unload(pipe)
    ppt = handle.pixels_per_token
    bad = [s for s in sizes if s % ppt]
    if bad:
        raise BenchInputError(f"sizes {bad} are not multiples of this pipeline's {ppt} pixels per latent token")
    config = handle.config
    transformer = pipe.transformer
    layers = len(attention_layers(transformer))
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim

    def generate(size, n_steps, decode=True):
        generator = torch.Generator("cpu").manual_seed(seed)
        start = time.perf_counter()
        image = pipe(prompt=prompt, height=size, width=size, num_inference_steps=n_steps, generator=generator,
                     output_type="pt" if decode else "latent").images[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return image.float().cpu(), time.perf_counter() - start

    modes = ("full", "clear")
    jobs = len(sizes) * len(modes) * (1 + repeats) + (len(sizes) if attention else 0)
    bar = tqdm(total=jobs, desc="bench pipeline", unit="run", disable=not progress, leave=False)
    timer = _StepTimer(transformer, device)
    record = {(s, m): {"steps": [], "gen": [], "peak": None, "image": None, "shape": None}
              for s in sizes for m in modes}
    try:
        for round_ in range(1 + repeats):  # round 0: one-step warm-up generation, peak memory measured
            for mode in modes:
                if mode == "clear":
                    install()
                try:
                    for size in sizes:
                        bar.set_postfix_str(f"{'warm-up' if round_ == 0 else f'round {round_}'} {mode} {size}px")
                        rec = record[(size, mode)]
                        timer.reset()
                        if round_ == 0:  # the VAE decode is left out: identical in both modes, and its
                            # peak (quadratic mid-block attention) would hide the step's at high resolution
                            if memory:
                                rec["peak"] = bench.peak_bytes(lambda: generate(size, 1, decode=False), device)
                            else:
                                generate(size, 1, decode=False)
                            rec["shape"] = timer.shapes[-1] if timer.shapes else None
                        else:
                            rec["image"], seconds = generate(size, steps)
                            rec["gen"].append(seconds)
                            rec["steps"].extend(timer.times)
                        bar.update()
                finally:
                    if mode == "clear":
                        api.unload(pipe)
        points = []
        for size in sizes:
            full, clear = record[(size, "full")], record[(size, "clear")]
            shape = full["shape"] or {}
            grid = shape.get("grid") or (size // ppt, size // ppt)
            text = shape.get("text_tokens") or 0
            flops = handle.attention_flops(grid[0] * ppt, grid[1] * ppt, text_len=text)
            step_full, step_clear = statistics.median(full["steps"]), statistics.median(clear["steps"])
            point = {
                "size": size, "height": size, "width": size, "grid": list(grid), "text_tokens": text,
                "tokens": flops["tokens"], "steps": steps,
                "step_s_full": step_full, "step_s_clear": step_clear, "speedup": step_full / step_clear,
                "step_times_full": full["steps"], "step_times_clear": clear["steps"],
                "gen_s_full": statistics.median(full["gen"]), "gen_s_clear": statistics.median(clear["gen"]),
                "peak_bytes": {"full": full["peak"], "clear": clear["peak"]},
                "psnr": psnr(clear["image"], full["image"]),
                "attention_flop_fraction": flops["fraction"],
                "attention_share": None, "attention_share_clear": None,
            }
            point["gen_speedup"] = point["gen_s_full"] / point["gen_s_clear"]
            if attention:
                bar.set_postfix_str(f"attention kernel {grid[0]}x{grid[1]} tokens")
                kernel = bench.bench_attention(
                    tuple(grid), config.window_size, text=text, heads=heads, head_dim=head_dim,
                    down=config.down_factor, backends=["sdpa"], dtype=_dtype_name(dtype), device=device,
                    repeats=attention_repeats, memory=False, check_queries=256, seed=seed)
                by = {r["backend"]: r for r in kernel["results"]}
                t_full, t_clear = by["sdpa"]["median_s"], by[kernel["default_backend"]]["median_s"]
                point.update({
                    "attention_s_full": layers * t_full, "attention_s_clear": layers * t_clear,
                    "attention_share": min(1.0, layers * t_full / step_full),
                    "attention_share_clear": min(1.0, layers * t_clear / step_clear),
                    "attention_speedup": kernel["speedup"], "attention_backend": kernel["default_backend"],
                    "attention_max_abs_error": kernel["max_abs_error"]})
                bar.update()
            points.append(point)
    finally:
        timer.close()
        bar.close()
    load_after = bench.load_average()
    return {
        "pipeline": str(source) if source is not None else type(pipe).__name__, "pipeline_class": type(pipe).__name__,
        "adapter": adapter, "installed_with": "load" if adapter else "attach",
        "window": config.window_size, "down": config.down_factor, "steps": steps, "repeats": repeats,
        "prompt": prompt, "seed": seed, "dtype": _dtype_name(dtype), "pixels_per_token": ppt,
        "attention_layers": layers, "heads": heads, "head_dim": head_dim,
        "conditions": conditions, "load_1min_after": load_after,
        "warning": bench.load_warning(conditions, load_after), "sizes": points,
    }


def format_pipeline(result: dict) -> str:
    """A human-readable table of one :func:`bench_pipeline` result."""
    how = f"adapter {result['adapter']}" if result["adapter"] else f"attach(window={result['window']:g})"
    lines = [f"pipeline {result['pipeline']} ({result['pipeline_class']}), CLEAR by {how}, {result['steps']} steps, "
             f"{result['dtype']}, {result['attention_layers']} attention layers of "
             f"{result['heads']}x{result['head_dim']}, "
             f"median of {result['repeats']} round(s)",
             f"{'size':>6} {'tokens':>7} {'step full':>10} {'CLEAR':>9} {'speedup':>8} {'gen full':>9} {'CLEAR':>8} "
             f"{'attn share':>10} {'peak MB full':>12} {'CLEAR':>8} {'PSNR':>8}"]

    def mb(x):
        return "n/a" if x is None else f"{x / 2**20:.0f}"

    for p in result["sizes"]:
        share = "n/a" if p["attention_share"] is None else f"{p['attention_share']:.0%}"
        lines.append(f"{p['size']:>5}px {p['tokens']:>7} {p['step_s_full']:>9.3f}s {p['step_s_clear']:>8.3f}s "
                     f"{p['speedup']:>7.2f}x {p['gen_s_full']:>8.2f}s {p['gen_s_clear']:>7.2f}s {share:>10} "
                     f"{mb(p['peak_bytes']['full']):>12} {mb(p['peak_bytes']['clear']):>8} {p['psnr']:>6.2f}dB")
    lines.append("step = one transformer forward; attn share = attention kernel time x layers / full-attention step; "
                 "peak = memory beyond the weights during text encoding + one step")
    lines.append(bench.format_conditions(result["conditions"], result.get("load_1min_after")))
    if result.get("warning"):
        lines.append(result["warning"])
    return "\n".join(lines)


def plot_pipeline(result: dict, path: str | Path) -> Path:
    """Log-log PNG: seconds per step (full, CLEAR) and per attention kernel x layers, against tokens."""
    series: dict[str, list] = {"step, full attention": [], "step, CLEAR": []}
    for p in result["sizes"]:
        series["step, full attention"].append((p["tokens"], p["step_s_full"]))
        series["step, CLEAR"].append((p["tokens"], p["step_s_clear"]))
        if p.get("attention_s_full"):
            series.setdefault("attention x layers, full", []).append((p["tokens"], p["attention_s_full"]))
            series.setdefault("attention x layers, CLEAR", []).append((p["tokens"], p["attention_s_clear"]))
    return bench.line_plot(series, path, f"{result['pipeline']}: seconds per denoising step", "tokens", "s")
