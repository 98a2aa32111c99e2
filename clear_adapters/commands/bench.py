"""`clear-adapters bench`: ``attention`` (full-attention SDPA vs CLEAR backends), ``pipeline`` (whole
generations, full attention vs CLEAR) and ``blocks`` (flex block efficiency)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import argtypes
from .common import add_threads_argument

DEFAULT_SWEEP = "64x64,96x96,128x128,160x160,192x192"


def register(subparsers) -> None:
    """Add this group's subcommands to the CLI."""
    bench = subparsers.add_parser("bench", help="benchmark CLEAR attention against full attention",
                                  description="Benchmarks measured in one process on this machine.")
    sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    sub.required = True

    p = sub.add_parser(
        "attention", help="time full-attention SDPA and every CLEAR backend on one problem",
        description="Times plain full attention (SDPA, no mask: the teacher) and every available CLEAR backend "
                    "side by side (warm-up, repeats, median), after checking each CLEAR backend against the CLEAR "
                    "dense reference on a slice of queries. Reports time, attention FLOPs, peak memory and "
                    "speedups. With --json the last line printed is one JSON object with 'speedup' and "
                    "'max_abs_error' of the device's default backend.")
    p.add_argument("--tokens", type=argtypes.grid, default=None, metavar="HxW",
                   help="image grid in latent tokens, e.g. 160x160")
    p.add_argument("--window", type=argtypes.window, required=True, metavar="R", help="window radius in tokens")
    p.add_argument("--text", type=argtypes.non_negative_int, default=512, metavar="T",
                   help="text tokens (default 512, as FLUX)")
    p.add_argument("--heads", type=argtypes.positive_int, default=24, metavar="H",
                   help="attention heads (default 24, as FLUX)")
    p.add_argument("--head-dim", type=argtypes.positive_int, default=128, metavar="D",
                   help="channels per head (default 128)")
    p.add_argument("--down", type=argtypes.down_factor, default=1, metavar="F",
                   help="K/V down-sampling factor (default 1)")
    p.add_argument("--batch", type=argtypes.positive_int, default=1)
    p.add_argument("--backend", action="append", default=None, metavar="NAME",
                   help="backend(s) to time, repeatable or comma-separated: sdpa, dense, tiled, tiled-gather, flex, "
                        "flex-row (default: sdpa, dense, tiled, flex, those that fit; the default CLEAR backend "
                        "and sdpa are always included)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", type=argtypes.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=argtypes.positive_int, default=5,
                   help="timed rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=argtypes.non_negative_int, default=1, help="untimed calls per backend (default 1)")
    p.add_argument("--check-queries", type=argtypes.positive_int, default=1024,
                   help="queries compared with the dense reference (default 1024)")
    p.add_argument("--tolerance", type=argtypes.non_negative, default=None,
                   help="max abs error allowed (default by dtype)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement (faster on CPU)")
    p.add_argument("--compile-flex", action="store_true",
                   help="compile FlexAttention on the CPU too (needs a C++ compiler; tens of seconds per shape)")
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0)
    add_threads_argument(p)
    p.add_argument("--sweep", type=argtypes.grids, nargs="?", const=DEFAULT_SWEEP, default=None, metavar="GRIDS",
                   help=f"benchmark several grids (comma-separated, default {DEFAULT_SWEEP}) and write --out "
                        "JSON and a log-log --plot PNG")
    p.add_argument("--out", default="bench_attention.json", help="sweep results (JSON)")
    p.add_argument("--plot", default="bench_attention.png", help="sweep plot (PNG, time vs tokens)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser(
        "pipeline", help="whole generations on a pipeline: full attention vs CLEAR, per image size",
        description="Generates the same prompt and seed with full attention and with CLEAR on one pipeline "
                    "(built-in name such as tiny, toy or flux-dev-random, a pipeline directory or a Hub id) at each "
                    "size, in interleaved rounds, after a one-step warm-up that measures peak memory. Reports per "
                    "size: seconds per denoising step (one transformer forward) and per generation, the speedup, the "
                    "attention kernel's share of a full-attention step, peak memory and the PSNR of the two images. "
                    "Writes --out (JSON) and --plot (PNG); with --json the last line printed is the JSON.")
    p.add_argument("--pipeline", default="tiny", metavar="SOURCE",
                   help="built-in (tiny, flux-dev-random, ...), pipeline directory or Hub id (default tiny)")
    p.add_argument("--sizes", type=argtypes.sizes, default="512,1024", metavar="PX,PX",
                   help="square image sizes in pixels, comma-separated (default 512,1024)")
    p.add_argument("--steps", type=argtypes.positive_int, default=4,
                   help="denoising steps per timed generation (default 4)")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="adapter to install (registry name, path, Hub id); default: the bare window pattern")
    p.add_argument("--window", type=argtypes.window, default=16.0, metavar="R",
                   help="window radius in tokens when no --adapter is given (default 16)")
    p.add_argument("--repeats", type=argtypes.positive_int, default=1,
                   help="timed rounds, interleaving full and CLEAR (default 1)")
    p.add_argument("--device", type=argtypes.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prompt", default=None)
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0)
    add_threads_argument(p)
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--no-attention", action="store_true",
                   help="skip timing the attention kernel alone (attention share)")
    p.add_argument("--out", default="bench_pipeline.json", help="results (JSON)")
    p.add_argument("--plot", default="bench_pipeline.png", help="plot (PNG, seconds per step vs tokens)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "blocks", help="block efficiency of the flex backend (row vs tile token order)",
        description="Efficiency = allowed (query, key) pairs / pairs inside the blocks FlexAttention computes, "
                    "counted on the BlockMask the flex backend builds. No attention is run and no N x N mask is "
                    "built. With --json the last line is one JSON object with 'efficiency'.")
    p.add_argument("--tokens", type=argtypes.grid, required=True, metavar="HxW")
    p.add_argument("--window", type=argtypes.window, required=True, metavar="R")
    p.add_argument("--text", type=argtypes.non_negative_int, default=512, metavar="T")
    p.add_argument("--block", type=argtypes.positive_int, default=128, metavar="B")
    p.add_argument("--order", default="tile", choices=["row", "tile"],
                   help="token order: tile (2-D tiles of one block, ours) or row (upstream); the other is shown beside")
    p.add_argument("--down", type=argtypes.down_factor, default=1, metavar="F")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_blocks)


def _backends(values):
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _write(result: dict, args, plot) -> int:
    """Write ``--out`` (JSON) and ``--plot`` (PNG); with ``--json`` print the JSON as the last line."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} and {plot(result, args.plot)}")
    if args.json:
        print(json.dumps(result))
    return 0


def _warn_if_loaded(bench) -> None:
    warning = bench.current_load_warning()
    if warning:
        print(warning, file=sys.stderr)


def cmd_attention(args) -> int:
    from .. import bench

    if not args.tokens and not args.sweep:  # refused before the load warning: one line for a bad call
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("bench attention needs --tokens HxW (or --sweep)")
    _warn_if_loaded(bench)
    kwargs = dict(text=args.text, heads=args.heads, head_dim=args.head_dim, down=args.down, batch=args.batch,
                  backends=_backends(args.backend), dtype=args.dtype, device=args.device, repeats=args.repeats,
                  warmup=args.warmup, check_queries=args.check_queries, tolerance=args.tolerance,
                  memory=not args.no_memory, seed=args.seed, compile_flex=args.compile_flex)
    if args.sweep:
        grids = [bench.parse_grid(g) for g in args.sweep.split(",") if g.strip()]
        result = bench.sweep_attention(grids, args.window, **kwargs)
        for point in result["points"]:
            print(bench.format_attention(point), end="\n\n")
        print(bench.format_sweep(result))
        return _write(result, args, bench.plot_sweep)
    result = bench.bench_attention(bench.parse_grid(args.tokens), args.window, **kwargs)
    print(bench.format_attention(result))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_pipeline(args) -> int:
    from .. import bench, pipeline_bench

    sizes = [int(s) for s in args.sizes.split(",")]  # checked by argtypes.sizes
    _warn_if_loaded(bench)
    result = pipeline_bench.bench_pipeline(
        args.pipeline, sizes, steps=args.steps, adapter=args.adapter, window=args.window, repeats=args.repeats,
        device=args.device, dtype=args.dtype, prompt=args.prompt or pipeline_bench.DEFAULT_PROMPT, seed=args.seed,
        memory=not args.no_memory, attention=not args.no_attention, progress=not args.no_progress)
    print(pipeline_bench.format_pipeline(result))
    return _write(result, args, pipeline_bench.plot_pipeline)


def cmd_blocks(args) -> int:
    from .. import bench

    result = bench.bench_blocks(bench.parse_grid(args.tokens), args.window, text=args.text, block=args.block,
                                order=args.order, down=args.down)
    print(bench.format_blocks(result))
    if args.json:
        print(json.dumps(result))
    return 0
