"""GPU benchmark of CLEAR on FLUX.1-dev shapes: attention kernels and a full transformer forward.

    python examples/gpu_benchmark.py --out results.json     # CUDA machine (one H100: about 10 minutes)
    python examples/gpu_benchmark.py --small --out s.json   # tiny shapes; runs on a CPU too (the tests do)

Part 1, attention (FLUX.1-dev: 24 heads x 128 channels, 512 text tokens, window 16) at 2K/4K/8K images,
i.e. 128x128, 256x256 and 512x512 latent tokens: full-attention SDPA (the teacher) against compiled
FlexAttention in the upstream row-major token order ("flex-row") and in our 2-D tile order ("flex").
Every CLEAR kernel is first checked against the CLEAR dense reference on a slice of queries.

Part 2, whole generations: ``clear-adapters bench pipeline`` (:func:`clear_adapters.pipeline_bench.bench_pipeline`)
on the built-in ``flux-dev-random`` pipeline -- FLUX.1-dev's transformer and VAE with random bf16
weights, built on the GPU, nothing downloaded -- at 1K/2K/4K (8K with --pipeline-sizes): seconds per
denoising step and per generation with full attention and with CLEAR (``attach``, r=16), the attention
share of a step and peak memory. These are the paper's end-to-end speed table (Table 3, one H100) as
ratios. Before timing, CLEAR's default backend is checked against the dense CLEAR backend inside the
transformer on a small grid.

Without CUDA (and without --small) the script says so and exits 0. Timings are medians of one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import clear_adapters
from clear_adapters import bench, pipeline_bench
from clear_adapters.random_flux import FLUX_DEV_TRANSFORMER, build_flux_transformer, flux_dev_random_pipeline

#: the same architecture in miniature, for --small (a smoke test that runs on a CPU)
SMALL_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
SMALL_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)

#: shared with examples/distill_flux.py and examples/gpu_xdit.py: FLUX.1-dev's transformer config, and the
#: same architecture in miniature (a full FLUX transformer config) for their --small modes
FLUX_DEV_CONFIG = FLUX_DEV_TRANSFORMER
SMALL_CONFIG = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))

FULL = dict(attention_grids="128x128,256x256,512x512", pipeline_sizes="1024,2048,4096", steps=4, check_grid="32x32",
            text=512, window=16.0, config=FLUX_DEV_TRANSFORMER, check_queries=256, model_tolerance=0.1)
SMALL = dict(attention_grids="16x16,24x24", pipeline_sizes="32,48", steps=2, check_grid="6x6", text=8, window=4.0,
             config={**FLUX_DEV_TRANSFORMER, **SMALL_TRANSFORMER}, check_queries=256, model_tolerance=1e-3)


def log(message: str) -> None:
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``FluxTransformer2DModel(**config)`` with seeded random weights, created directly in ``dtype`` on ``device``."""
    return build_flux_transformer(config, device=device, dtype=dtype, seed=seed)


# ------------------------------------------------------------------------------------------ attention
def run_attention(grids, preset: dict, device: torch.device, dtype: str, repeats: int) -> list[dict]:
    config = preset["config"]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    results = []
    for grid in grids:
        log(f"\n== attention {grid[0]}x{grid[1]} tokens + {preset['text']} text, {heads} heads x {head_dim}, "
            f"window {preset['window']:g}, {dtype} on {device}")
        result = bench.bench_attention(grid, preset["window"], text=preset["text"], heads=heads, head_dim=head_dim,
                                       backends=["sdpa", "flex-row", "flex"], dtype=dtype, device=device,
                                       repeats=repeats, check_queries=preset["check_queries"], memory=True)
        log(bench.format_attention(result))
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------ pipeline
def transformer_inputs(config: dict, grid, text: int, device, dtype, seed: int = 0) -> dict:
    """A FLUX forward's arguments for a ``grid`` of latent tokens (ids laid out as FluxPipeline does)."""
    h, w = grid
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    args = dict(hidden_states=torch.randn(1, h * w, config["in_channels"], generator=gen),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=gen),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen),
                timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(text, 3),
                guidance=torch.tensor([3.5]))
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids")
                    else v.dtype) for k, v in args.items()}


def forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def timed(model, inputs, device, repeats: int) -> tuple[float, list[float], int | None]:
    """(median seconds, all times, peak bytes of one extra forward on CUDA) after one warm-up forward."""
    forward(model, inputs)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(model, inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward(model, inputs)
        sync(device)
        peak = int(torch.cuda.max_memory_allocated(device) - base)
    return statistics.median(times), times, peak


def check_transformer(model, preset: dict, device, dtype) -> float:
    """Relative max difference of the default CLEAR backend against the dense CLEAR backend."""
    grid = bench.parse_grid(preset["check_grid"])
    inputs = transformer_inputs(preset["config"], grid, preset["text"], device, dtype, seed=1)
    clear_adapters.attach(preset["window"], model, backend="dense")
    reference = forward(model, inputs).float()
    clear_adapters.unload(model)
    clear_adapters.attach(preset["window"], model)
    got = forward(model, inputs).float()
    clear_adapters.unload(model)
    if not torch.isfinite(reference).all():
        raise SystemExit("the random-weight transformer produced non-finite outputs; cannot check")
    return float((got - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def run_pipeline(sizes, preset: dict, device: torch.device, dtype: torch.dtype, repeats: int, small: bool) -> dict:
    config = preset["config"]
    log(f"\n== flux-dev-random pipeline ({config['num_layers']} double + {config['num_single_layers']} single "
        f"blocks, {config['num_attention_heads']}x{config['attention_head_dim']}), random weights, {dtype} on {device}")
    start = time.perf_counter()
    if small:
        overrides = {k: v for k, v in config.items() if FLUX_DEV_TRANSFORMER.get(k) != v}
        pipe = flux_dev_random_pipeline(device=device, dtype=dtype, vae=SMALL_VAE, **overrides)
    else:
        pipe = flux_dev_random_pipeline(device=device, dtype=dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    log(f"built in {time.perf_counter() - start:.1f} s: transformer {params / 1e9:.2f} B parameters")
    error = check_transformer(pipe.transformer, preset, device, dtype)
    tolerance = preset["model_tolerance"]
    log(f"check on {preset['check_grid']}: default CLEAR backend vs dense CLEAR backend, relative max difference "
        f"{error:.2e} (tolerance {tolerance:g})")
    if not error <= tolerance:
        raise SystemExit(f"CLEAR transformer output differs from the dense reference by {error:.3g} (relative)")
    result = pipeline_bench.bench_pipeline("flux-dev-random", sizes, steps=preset["steps"], window=preset["window"],
                                           repeats=repeats, device=device, dtype=dtype, pipe=pipe, progress=False)
    result["check_relative_error"] = error
    log(pipeline_bench.format_pipeline(result))
    del pipe
    return result


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_benchmark.json", help="results (JSON)")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes that run anywhere (CPU included): a smoke test of this script")
    parser.add_argument("--device", default=None, help="default: cuda (cpu only with --small)")
    parser.add_argument("--attention-grids", default=None, help="comma-separated HxW token grids")
    parser.add_argument("--pipeline-sizes", default=None,
                        help="comma-separated image sizes in pixels for part 2 (default 1024,2048,4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args(argv)

    preset = SMALL if args.small else FULL
    # each (shape, token order) compiles its own FlexAttention kernel; the default limit of 8 would
    # silently fall back to the unfused kernel, which materialises N x N scores
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if args.device is None and not torch.cuda.is_available() and not args.small:
        log("CUDA is not available: skipping the GPU benchmark (run with --small for a CPU smoke test).")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    grids = [bench.parse_grid(g) for g in (args.attention_grids or preset["attention_grids"]).split(",")]
    sizes = [int(size) for size in (args.pipeline_sizes or preset["pipeline_sizes"]).split(",")]
    environment = {**bench.machine_conditions(device), "clear_adapters": clear_adapters.__version__,
                   "python": sys.version.split()[0], "small": args.small}
    log(f"clear-adapters GPU benchmark: {environment}")
    results = {"environment": environment, "window": preset["window"], "text": preset["text"],
               "attention": [], "pipeline": None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_attention:
        results["attention"] = run_attention(grids, preset, device, dtype_name, args.repeats)
        out.write_text(json.dumps(results, indent=1))  # keep part 1 even if part 2 runs out of memory
    if not args.skip_pipeline:
        results["pipeline"] = run_pipeline(sizes, preset, device, dtype, max(1, args.repeats // 2), args.small)
    out.write_text(json.dumps(results, indent=1))
    log(f"\nsummary ({environment['device']}):")
    for r in results["attention"]:
        by = {x["backend"]: x for x in r["results"]}
        flex_row = by.get("flex-row", {}).get("median_s")
        row_note = f", flex-row {by['sdpa']['median_s'] / flex_row:.2f}x" if flex_row else ""
        log(f"  attention {r['case']['height']}x{r['case']['width']}: CLEAR ({r['default_backend']}) "
            f"{r['speedup']:.2f}x vs SDPA{row_note}; FLOP ratio {r['flop_ratio']:.1f}x")
    for p in (results["pipeline"] or {}).get("sizes", []):
        log(f"  pipeline {p['size']}px: {p['speedup']:.2f}x per step, {p['gen_speedup']:.2f}x per generation "
            f"(attention {p['attention_share']:.0%} of a full-attention step)")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
