"""Benchmarks: full-attention SDPA (the teacher) against the CLEAR backends, and flex block efficiency.

:func:`bench_attention` times plain full attention (``scaled_dot_product_attention`` without a mask,
what FLUX runs) and every CLEAR backend available on the device side by side in one process: one
warm-up call each, then ``repeats`` rounds that run every backend once in turn (so drift in machine
load hits all of them alike), reporting the median. Before anything is timed, each CLEAR backend is
checked against the CLEAR dense reference on a slice of queries (the full N x N mask of a large grid
would not fit); a backend that disagrees raises :class:`BenchMismatchError`.

Peak memory is *measured*, never estimated: the most memory held by tensors allocated during one call,
beyond the inputs. On CUDA that is ``torch.cuda.max_memory_allocated``. On CPU torch's allocations
bypass ``tracemalloc`` and RSS hides them behind the C allocator's reuse of freed pages, so the
allocation and free events the torch profiler records (``profile_memory=True``) are replayed in time
order: the same quantity as on CUDA, counted by torch itself (scratch space MKL/oneDNN allocate
outside torch tensors is not included, as on CUDA).

Inputs are laid out as FLUX attention produces them, ``(B, N, H, D).transpose(1, 2)``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .config import ClearConfig
from .errors import ClearAdapterError
from .geometry import Geometry
from .kernels import clear_attention, flex_available, resolve_backend
from .kernels.flex import DEFAULT_BLOCK, block_efficiency, flex_attention_clear
from .kernels.tiled import tiled_attention

logger = logging.getLogger("clear_adapters")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: largest full (queries x keys x batch x heads) matrix a backend may materialise in a benchmark: the
#: "dense" CLEAR reference builds the N x N mask, eager (uncompiled) flex the N x N scores
MATERIALISE_LIMIT = 1 << 25
#: full-sequence backends timed by default; "tiled-gather" (the differentiable path) and "flex-row"
#: (the upstream token order) on request
DEFAULT_BACKENDS = ("sdpa", "dense", "tiled", "flex")
ALL_BACKENDS = ("sdpa", "dense", "tiled", "tiled-gather", "flex", "flex-row")

#: A CLEAR backend under test: ``fn(q, k, v, geometry, config, spatial_weight) -> (B, H, T + N, D)``.
BackendFn = Callable[..., torch.Tensor]


class BenchMismatchError(ClearAdapterError):
    """A benchmarked backend does not match the CLEAR dense reference."""


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem: a text + image-grid sequence and the CLEAR pattern applied to it."""

    height: int
    width: int
    window: float
    text: int = 512
    heads: int = 24
    head_dim: int = 128
    down: int = 1
    batch: int = 1
    dtype: str = "float32"

    def geometry(self) -> Geometry:
        return Geometry.from_grid(self.height, self.width, self.text)

    def config(self) -> ClearConfig:
        return ClearConfig(self.window, self.down)

    @property
    def tokens(self) -> int:
        return self.text + self.height * self.width


def parse_grid(text: str) -> tuple[int, int]:
    """``"160x160"`` (or ``"160"``) -> (160, 160) image tokens (latent grid after patchify)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"expected a token grid like 160x160, got {text!r}")
    return dims[0], dims[1]


def make_inputs(case: AttentionCase, device, seed: int = 0):
    """Random q, k, v (B, H, T + N, D) in FLUX's memory layout, and the pooling weight when d > 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]
    shape = (case.batch, case.tokens, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    d = case.down
    weight = None
    if d > 1:  # a non-uniform weight, so that a kernel ignoring it is caught by the check
        weight = (torch.rand((1, 1, 1, d, 1, d, 1), generator=gen) + 0.5)
        weight = (weight / weight.sum()).to(device=device, dtype=dtype)
    return q, k, v, weight


# ------------------------------------------------------------------------------------------ backends
def _run_clear(name: str, q, k, v, geometry, config, weight, compile_flex: bool = False):
    scale = config.softmax_scale(q.shape[-1], geometry.total_len)
    if name == "dense":
        return clear_attention(q, k, v, geometry, config, backend="dense", spatial_weight=weight)
    if name == "tiled":
        return tiled_attention(q, k, v, geometry, config, scale=scale, spatial_weight=weight)
    if name == "tiled-gather":
        return tiled_attention(q, k, v, geometry, config, scale=scale, spatial_weight=weight, method="gather")
    if name in ("flex", "flex-row"):
        order = "row" if name == "flex-row" else "tile"
        return flex_attention_clear(q, k, v, geometry, config, scale=scale, spatial_weight=weight, order=order,
                                    compiled=q.is_cuda or compile_flex)
    raise ValueError(f"unknown backend {name!r}; choose from {ALL_BACKENDS}")


def _run_sdpa(q, k, v, geometry, config):
    return F.scaled_dot_product_attention(q, k, v, scale=config.softmax_scale(q.shape[-1], geometry.total_len))


def run_backend(name: str, q, k, v, geometry: Geometry, config: ClearConfig, weight=None,
                compile_flex: bool = False):
    """One call of a named backend ("sdpa" is full attention, the rest are CLEAR backends).

    Flex runs compiled on CUDA, and on the CPU with ``compile_flex`` (else eagerly there).
    """
    if name == "sdpa":
        return _run_sdpa(q, k, v, geometry, config)
    return _run_clear(name, q, k, v, geometry, config, weight, compile_flex)


def unavailable_reason(name: str, case: AttentionCase, device: torch.device,
                       compile_flex: bool = False) -> str | None:
    """Why backend ``name`` is not benchmarked for ``case`` on ``device`` (None: it is)."""
    n = case.tokens
    if name == "dense" and n * n > MATERIALISE_LIMIT:
        return f"the full {n}x{n} CLEAR mask is too large to time (the check uses it on a slice)"
    if name.startswith("flex"):
        if not flex_available():
            return "torch.nn.attention.flex_attention is not available"
        if device.type != "cuda" and not compile_flex and case.batch * case.heads * n * n > MATERIALISE_LIMIT:
            return "uncompiled FlexAttention (CPU) materialises the N x N scores; too large (--compile-flex)"
    return None


# ------------------------------------------------------------------------------------------ checks
def check_query_index(geometry: Geometry, count: int, seed: int = 0) -> torch.Tensor:
    """Canonical positions of the queries the correctness check compares: all of them when few,
    otherwise text queries, the first and last image rows (clamped borders) and a random sample."""
    n = geometry.total_len
    if n <= count:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.arange(min(geometry.text_len, 64))]
    for g in geometry.grids or ():
        base = geometry.text_len + g.start
        picks.append(base + torch.arange(min(g.width, count // 8)))
        picks.append(base + g.size - 1 - torch.arange(min(g.width, count // 8)))
    chosen = torch.unique(torch.cat(picks))
    rest = max(0, count - chosen.numel())
    sample = torch.randint(0, n, (rest,), generator=gen)
    return torch.unique(torch.cat([chosen, sample]))


def reference_slice(q, k, v, geometry: Geometry, config: ClearConfig, weight, index: torch.Tensor):
    """The CLEAR dense reference for the queries at ``index`` (float64 on CPU, float32 elsewhere)."""
    ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    idx = index.to(q.device)
    q64, k64, v64 = (t.to(ref_dtype) for t in (q.index_select(2, idx), k, v))
    w64 = None if weight is None else weight.to(ref_dtype)
    scale = config.softmax_scale(q.shape[-1], geometry.total_len)
    return clear_attention(q64, k64, v64, geometry, config, backend="dense", spatial_weight=w64,
                           query_index=index, scale=scale)


def default_tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 5e-3}.get(dtype, 3e-2)


# ------------------------------------------------------------------------------------------ timing/memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak(fn, device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return int(torch.cuda.max_memory_allocated(device) - base)


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak bytes of tensors allocated during ``fn()`` beyond those alive before it (None: unknown)."""
    return _cuda_peak(fn, device) if device.type == "cuda" else _cpu_peak(fn)


def _cpu_peak(fn) -> int | None:
    """Peak bytes of torch CPU tensors allocated during ``fn()`` beyond those alive before it.

    Replays the allocation/free events the profiler records (``profile_memory=True``) in time order;
    this is the CPU counterpart of ``torch.cuda.max_memory_allocated``. None when the profiler's
    event stream is not available in this torch version.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except (AttributeError, RuntimeError) as exc:  # private event API moved
        logger.warning("cannot read allocation events from the profiler: %s", exc)
        return None
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


# ------------------------------------------------------------------------------------------ attention
def bench_attention(tokens: tuple[int, int], window: float, *, text: int = 512, heads: int = 24,
                    head_dim: int = 128, down: int = 1, batch: int = 1, backends=None, dtype: str | None = None,
                    device=None, repeats: int = 5, warmup: int = 1, check_queries: int = 1024,
                    tolerance: float | None = None, memory: bool = True,
                    extra_backends: Mapping[str, BackendFn] | None = None, seed: int = 0,
                    compile_flex: bool = False) -> dict:
    """Time full-attention SDPA and CLEAR backends on one problem; check every CLEAR backend first.

    Args:
        tokens: image grid (height, width) in latent tokens.
        window, down: the CLEAR pattern; ``text``: text tokens; ``heads``/``head_dim``/``batch``: shapes.
        backends: names from :data:`ALL_BACKENDS` (default :data:`DEFAULT_BACKENDS`, those that fit);
            the device's default CLEAR backend and ``"sdpa"`` are always included.
        dtype: ``"float32"`` (default on CPU), ``"bfloat16"`` (default on CUDA) or ``"float16"``.
        repeats, warmup: timed rounds (median reported) and untimed calls per backend.
        check_queries: queries compared against the dense reference (all when the sequence is shorter).
        tolerance: largest allowed max-abs difference (default by dtype: 1e-4 for float32).
        memory: measure peak memory per backend (one extra, untimed call each; see the module doc).
        extra_backends: more backends to time and check, ``{name: fn(q, k, v, geometry, config,
            spatial_weight)}`` — e.g. a candidate kernel, or a deliberately wrong one in tests.
        seed: inputs and query sample.
        compile_flex: compile FlexAttention on the CPU too (a C++ compiler is needed; tens of seconds per
            shape, paid in the warm-up call); without it CPU flex runs eagerly, and only where its
            N x N scores fit.

    Returns a JSON-ready dict with per-backend results, ``speedup`` (SDPA median / default CLEAR backend
    median) and ``max_abs_error`` (default backend vs the dense reference).

    Raises:
        BenchMismatchError: a CLEAR backend differs from the reference by more than ``tolerance``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    case = AttentionCase(tokens[0], tokens[1], float(window), text, heads, head_dim, down, batch, dtype)
    geometry, config = case.geometry(), case.config()
    default = resolve_backend("auto", device, geometry)
    unknown = sorted(set(backends or ()) - set(ALL_BACKENDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    wanted = list(dict.fromkeys(["sdpa", default, *(backends or DEFAULT_BACKENDS)]))
    skipped = {}
    names = []
    for name in wanted:
        reason = unavailable_reason(name, case, device, compile_flex)
        if reason is None:
            names.append(name)
        elif name == default:
            raise ValueError(f"the default backend {name!r} cannot run here: {reason}")
        else:
            skipped[name] = reason
    extra = dict(extra_backends or {})
    clash = set(extra) & set(ALL_BACKENDS)
    if clash:
        raise ValueError(f"extra backend names must not shadow built-in ones: {sorted(clash)}")

    q, k, v, weight = make_inputs(case, device, seed)
    conditions = machine_conditions(device)

    def call(name):
        if name in extra:
            return extra[name](q, k, v, geometry, config, weight)
        return run_backend(name, q, k, v, geometry, config, weight, compile_flex)

    all_names = names + list(extra)
    tol = default_tolerance(DTYPES[dtype]) if tolerance is None else float(tolerance)
    index = check_query_index(geometry, check_queries, seed)
    errors: dict[str, float] = {}
    with torch.no_grad():
        ref = reference_slice(q, k, v, geometry, config, weight, index)
        for name in all_names:
            out = None
            for _ in range(max(1, warmup)):
                out = call(name)
            _sync(device)
            if name == "sdpa":
                continue  # the teacher computes full attention: a different function by design
            expected = (case.batch, case.heads, case.tokens, case.head_dim)
            if tuple(out.shape) != expected:
                raise BenchMismatchError(f"backend {name!r} returned shape {tuple(out.shape)}, expected {expected}")
            got = out.index_select(2, index.to(device)).to(ref.dtype)
            err = float((got - ref).abs().max()) if torch.isfinite(got).all() else math.inf
            errors[name] = err
            logger.info("check %s: max abs error %.3g on %d queries", name, err, index.numel())
        del out
        bad = {n: e for n, e in errors.items() if not e <= tol}
        if bad:
            detail = ", ".join(f"{n!r} by {e:.3g}" for n, e in bad.items())
            raise BenchMismatchError(
                f"CLEAR backend output differs from the dense reference ({detail}, max abs over "
                f"{index.numel()} queries of {case.tokens}); tolerance {tol:g} for {dtype}. "
                "The timings would be meaningless; fix the kernel or pass a larger tolerance.")

        times: dict[str, list[float]] = {n: [] for n in all_names}
        for _ in range(max(1, repeats)):
            for name in all_names:
                _sync(device)
                start = time.perf_counter()
                out = call(name)
                _sync(device)
                times[name].append(time.perf_counter() - start)
                del out

        peaks: dict[str, int | None] = {}
        if memory:
            for name in all_names:
                fn = (lambda n=name: call(n))
                peaks[name] = peak_bytes(fn, device)

    load_after = load_average()
    full_flops = geometry.attention_flops(head_dim, heads, None, batch)
    clear_flops = geometry.attention_flops(head_dim, heads, config, batch)
    sdpa_median = statistics.median(times["sdpa"])
    results = []
    for name in all_names:
        med = statistics.median(times[name])
        flops = full_flops if name == "sdpa" else clear_flops
        results.append({
            "backend": name, "median_s": med, "times_s": times[name], "attention_flops": flops,
            "best_s": min(times[name]), "gflops_per_s": flops / med / 1e9, "speedup_vs_sdpa": sdpa_median / med,
            "peak_extra_bytes": peaks.get(name), "max_abs_error": errors.get(name),
        })
    by_name = {r["backend"]: r for r in results}
    mem_method = None
    if memory:
        mem_method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
            "peak of torch CPU allocations during one call (profiler memory events)"
    return {
        "case": asdict(case), "tokens": case.tokens, "device": conditions["device"],
        "threads": conditions["threads"], "torch": conditions["torch"], "conditions": conditions,
        "load_1min_after": load_after, "warning": load_warning(conditions, load_after), "default_backend": default,
        "repeats": repeats, "checked_queries": int(index.numel()), "tolerance": tol,
        "full_flops": full_flops, "clear_flops": clear_flops, "flop_ratio": full_flops / clear_flops,
        "memory_method": mem_method, "results": results, "skipped": skipped,
        "speedup": sdpa_median / by_name[default]["median_s"],
        "speedup_best": by_name["sdpa"]["best_s"] / by_name[default]["best_s"], "max_abs_error": errors[default],
    }


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({cores()} cores)"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``/proc/cpuinfo``), else what platform knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cores() -> int:
    """The cores this process may run on (containers and taskset restrict them), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def current_load_warning() -> str | None:
    """:func:`load_warning` for the load right now."""
    return load_warning({"cores": cores(), "load_1min": load_average()})


def machine_conditions(device: torch.device) -> dict:
    """What a measured figure depends on: device, CPU model, cores, torch threads, torch version, load."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"device": _describe_device(device), "cpu": cpu_model(), "cpu_capability": capability, "cores": cores(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_1min": load_average()}


def load_warning(conditions: dict, load_after: float | None = None) -> str | None:
    """A warning when the 1-minute load (before or after the run) is above the number of cores.

    Other processes then compete for the cores, and not evenly: a kernel made of many short parallel
    regions (``tiled``) loses more than one long call (SDPA), so ratios measured under load are
    distorted, not just noisier.
    """
    cores = conditions.get("cores") or 0
    loads = [x for x in (conditions.get("load_1min"), load_after) if x is not None]
    if not cores or not loads or max(loads) <= cores:
        return None
    return (f"warning: the 1-minute load ({max(loads):.1f}) is above the {cores} cores of this machine: other "
            "processes compete for the CPU and distort the ratios (the tiled kernel loses more than SDPA); "
            "measure on a quiet machine for figures to quote")


def format_attention(result: dict) -> str:
    """A human-readable table of one :func:`bench_attention` result."""
    c = result["case"]
    lines = [
        f"attention: {c['height']}x{c['width']} image + {c['text']} text tokens ({result['tokens']}), window "
        f"{c['window']:g}, down {c['down']}, {c['batch']}x{c['heads']} heads x {c['head_dim']}, {c['dtype']}, "
        f"{result['device']}, {result['threads']} threads, median of {result['repeats']}",
        f"{'backend':<13} {'median':>10} {'attn GFLOP':>11} {'GFLOP/s':>9} {'peak MB':>9} {'vs SDPA':>8} "
        f"{'max err':>9}",
    ]
    for r in result["results"]:
        peak = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        err = "teacher" if r["backend"] == "sdpa" else f"{r['max_abs_error']:.1e}"
        mark = " *" if r["backend"] == result["default_backend"] else ""
        lines.append(f"{r['backend'] + mark:<13} {r['median_s'] * 1e3:>8.1f}ms {r['attention_flops'] / 1e9:>11.2f} "
                     f"{r['gflops_per_s']:>9.1f} {peak:>9} {r['speedup_vs_sdpa']:>7.2f}x {err:>9}")
    for name, reason in result["skipped"].items():
        lines.append(f"{name:<13} skipped: {reason}")
    lines.append(f"* default CLEAR backend: speedup {result['speedup']:.2f}x over full-attention SDPA (medians; "
                 f"{result['speedup_best']:.2f}x best round against best round; FLOP ratio "
                 f"{result['flop_ratio']:.1f}x), max abs error {result['max_abs_error']:.1e} vs the dense reference "
                 f"on {result['checked_queries']} queries")
    if result["memory_method"]:
        lines.append(f"peak memory: {result['memory_method']}")
    lines.append(format_conditions(result["conditions"], result.get("load_1min_after")))
    if result.get("warning"):
        lines.append(result["warning"])
    return "\n".join(lines)


def format_conditions(conditions: dict, load_after: float | None = None) -> str:
    """One line naming what the figures depend on."""
    load = conditions.get("load_1min")
    loads = "n/a" if load is None else f"{load:.2f}" + ("" if load_after is None else f" -> {load_after:.2f}")
    return (f"conditions: {conditions['device']}, {conditions['threads']} torch threads, torch {conditions['torch']}, "
            f"1-minute load {loads}")


# ------------------------------------------------------------------------------------------ sweep
def sweep_attention(grids, window: float, **kwargs) -> dict:
    """:func:`bench_attention` over several grids (same shapes otherwise); returns all points."""
    from .progress import progress

    points = []
    for grid in progress(grids, desc="sweep", unit="grid"):  # shown on a terminal only
        logger.info("sweep: %dx%d", *grid)
        points.append(bench_attention(grid, window, **kwargs))
    backends = sorted({r["backend"] for p in points for r in p["results"]})
    return {"window": window, "points": points, "backends": backends}


def format_sweep(sweep: dict) -> str:
    """Time and memory per backend and grid, plus growth factors between consecutive grids."""
    pts = sweep["points"]
    names = [n for n in sweep["backends"]]
    head = f"{'grid':>9} {'tokens':>7} " + " ".join(f"{n + ' ms':>13} {n + ' MB':>12}" for n in names) + \
        f" {'speedup':>8}"
    lines = [head]
    for p in pts:
        by = {r["backend"]: r for r in p["results"]}
        cells = []
        for n in names:
            r = by.get(n)
            if r is None:
                cells.append(f"{'-':>13} {'-':>12}")
                continue
            mb = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
            cells.append(f"{r['median_s'] * 1e3:>13.1f} {mb:>12}")
        c = p["case"]
        lines.append(f"{c['height']}x{c['width']:<5} {p['tokens']:>7} " + " ".join(cells) + f" {p['speedup']:>7.2f}x")
    return "\n".join(lines)


def growth(sweep: dict, backend: str, small: tuple[int, int], large: tuple[int, int]) -> dict:
    """Time and peak-memory growth of ``backend`` between two grids of a sweep."""
    def point(grid):
        for p in sweep["points"]:
            if (p["case"]["height"], p["case"]["width"]) == tuple(grid):
                return {r["backend"]: r for r in p["results"]}[backend], p["tokens"]
        raise KeyError(f"grid {grid} not in the sweep")
    (a, ta), (b, tb) = point(small), point(large)
    mem = None
    if a["peak_extra_bytes"] and b["peak_extra_bytes"] is not None:
        mem = b["peak_extra_bytes"] / a["peak_extra_bytes"]
    return {"tokens": tb / ta, "time": b["median_s"] / a["median_s"], "memory": mem}


def plot_sweep(sweep: dict, path: str | Path) -> Path:
    """Log-log PNG of median time against tokens per backend."""
    labels = {"sdpa": "sdpa (full attention)", "dense": "dense (CLEAR reference)"}
    series = {}
    for p in sweep["points"]:
        for r in p["results"]:
            series.setdefault(labels.get(r["backend"], r["backend"]), []).append((p["tokens"], r["median_s"]))
    return line_plot(series, path, f"attention time vs tokens (window {sweep['window']:g})", "tokens", "s")


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: Mapping[str, list], path: str | Path, title: str, x_label: str, y_unit: str) -> Path:
    """A log-log PNG (PIL only): one line per ``{name: [(x, y), ...]}``, decades as grid lines."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height, left, right, top, bottom = 800, 520, 80, 230, 40, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, y in pts if x > 0 and y > 0]
    ys = [y for pts in series.values() for x, y in pts if x > 0 and y > 0]
    if not xs:
        raise ValueError("nothing to plot: no positive points")
    lx0, lx1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    lx1, ly1 = max(lx1, lx0 + 1), max(ly1, ly0 + 1)

    def px(x, y):
        fx = (math.log10(x) - lx0) / (lx1 - lx0)
        fy = (math.log10(y) - ly0) / (ly1 - ly0)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in range(lx0, lx1 + 1):
        x, _ = px(10 ** e, 10 ** ly0)
        draw.line([x, top, x, height - bottom], fill=(220, 220, 220))
        draw.text((x - 12, height - bottom + 6), f"1e{e}", fill="black")
    for e in range(ly0, ly1 + 1):
        _, y = px(10 ** lx0, 10 ** e)
        draw.line([left, y, width - right, y], fill=(220, 220, 220))
        draw.text((left - 45, y - 6), f"1e{e}{y_unit}", fill="black")
    draw.text((left, 12), title + " (log-log)", fill="black")
    draw.text(((width - right + left) // 2 - 20, height - 25), x_label, fill="black")
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = _COLORS[i % len(_COLORS)]
        coords = [px(x, y) for x, y in sorted(pts) if x > 0 and y > 0]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        ly = top + 10 + 18 * i
        draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=color, width=3)
        draw.text((width - right + 36, ly), name, fill="black")
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------ blocks
def bench_blocks(tokens: tuple[int, int], window: float, *, text: int = 512, block: int = DEFAULT_BLOCK,
                 order: str = "tile", down: int = 1) -> dict:
    """Block efficiency of the flex path (true mask entries / entries in the blocks it computes).

    Counted on the BlockMask the flex backend builds for ``order``, with the other order beside it.
    """
    geometry = Geometry.from_grid(tokens[0], tokens[1], text)
    config = ClearConfig(window, down)
    start = time.perf_counter()
    main = block_efficiency(geometry, config, order, block)
    elapsed = time.perf_counter() - start
    other_order = "row" if order == "tile" else "tile"
    other = block_efficiency(geometry, config, other_order, block)
    return {"tokens": geometry.total_len, "grid": list(tokens), "window": window, "text": text, "down": down,
            "block": block, "order": order, "efficiency": main["efficiency"], "blocks": main,
            f"{other_order}_efficiency": other["efficiency"], f"{order}_efficiency": main["efficiency"],
            "compare": other, "seconds": elapsed}


def format_blocks(result: dict) -> str:
    lines = [f"flex block efficiency: {result['grid'][0]}x{result['grid'][1]} image + {result['text']} text tokens, "
             f"window {result['window']:g}, down {result['down']}, block {result['block']}",
             f"{'order':<6} {'efficiency':>10} {'computed':>9} {'full':>7} {'partial':>8}"]
    for b in (result["blocks"], result["compare"]):
        mark = " *" if b["order"] == result["order"] else ""
        lines.append(f"{b['order']:<6} {b['efficiency']:>10.3f} {b['computed_blocks']:>9} {b['full_blocks']:>7} "
                     f"{b['partial_blocks']:>8}{mark}")
    lines.append("efficiency = allowed (query, key) pairs / pairs inside the blocks FlexAttention computes")
    return "\n".join(lines)
