"""Core subcommands: ``list``, ``info``, ``demo`` and ``generate``."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from . import argtypes
from .common import add_threads_argument

DEMO_ADAPTER = "data/demo_adapter_r4.safetensors"
DEMO_PROMPT = "a photo of a red house by the sea"


def register(sub) -> None:
    p = sub.add_parser("list", help="list the registry's adapters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="describe an adapter (registry name, local path, Hub repo id or repo file)",
                       description="Describe an adapter without downloading its weights. NAME takes every form "
                                   "`load` does: a registry name, a local file or directory, a Hub repo id "
                                   "(owner/name) or a file in one (owner/name/file.safetensors).")
    p.add_argument("name")
    add_source_arguments(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="offline demo: full attention vs CLEAR distilled vs CLEAR zero-shot on the toy",
                       description="Default: the trained toy FLUX shipped in the package (32 px): a few prompts, "
                                   "columns full attention | CLEAR distilled (toy/r4) | CLEAR zero-shot | difference. "
                                   "--pipeline tiny: the random-weight test pipeline at larger sizes (FLOPs, timing).")
    p.add_argument("--pipeline", default="toy", choices=["toy", "tiny"])
    p.add_argument("--out", default="clear_demo.png", help="where to write the PNG")
    p.add_argument("--prompt", action="append", default=None, help="toy prompt (repeatable; default: four examples)")
    p.add_argument("--adapter", default=None, help="toy only: CLEAR adapter (default toy = toy/r4)")
    p.add_argument("--sizes", type=argtypes.sizes, default=None,
                   help="tiny only: square image sizes in pixels (4 px/token; default 128,256)")
    p.add_argument("--steps", type=argtypes.positive_int, default=None, help="default: toy 8, tiny 4")
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate an image with a CLEAR adapter")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="diffusers FLUX pipeline: Hub id, local directory, or 'tiny' (offline test pipeline)")
    p.add_argument("--adapter", default="flux-dev", help="registry name, local path or Hub repo id; 'none' for full")
    add_source_arguments(p)
    p.add_argument("--window-size", type=argtypes.window, default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--height", type=argtypes.positive_int, default=1024)
    p.add_argument("--width", type=argtypes.positive_int, default=1024)
    p.add_argument("--steps", type=argtypes.positive_int, default=28)
    p.add_argument("--guidance", type=argtypes.finite, default=3.5)
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0)
    p.add_argument("--device", type=argtypes.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "dense", "tiled", "flex"])
    p.add_argument("--proportional-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="the authors' high-resolution logit scale (default: as the adapter records it)")
    p.add_argument("--out", default="clear_image.png")
    add_threads_argument(p)
    p.set_defaults(func=cmd_generate)


def cmd_list(args) -> int:
    from ..registry import list_adapters

    entries = list_adapters()
    if args.json:
        print(json.dumps([e.describe() for e in entries], indent=2))
        return 0
    print(f"{'name':<20} {'window':>6} {'down':>4}  {'base model':<34} source")
    for e in entries:
        source = e.source + (f" (alias of {e.alias_of})" if e.alias_of else "")
        flag = " [zero-shot]" if e.zero_shot else ""
        print(f"{e.name:<20} {e.window_size:>6g} {e.down_factor:>4}  {e.base_model:<34} {source}{flag}")
    return 0


def add_source_arguments(parser) -> None:
    """Where an adapter's file is, as diffusers loaders say it (``--weight-name``, ``--subfolder``, ...)."""
    parser.add_argument("--weight-name", default=None, metavar="FILE",
                        help="which .safetensors file of the repo or directory (needed when it has several)")
    parser.add_argument("--subfolder", default=None, metavar="DIR", help="folder inside the repo or directory")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="Hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--local-files-only", action="store_true", help="use the Hub cache only, never the network")


def _source_options(args) -> dict:
    return {"weight_name": args.weight_name, "subfolder": args.subfolder, "revision": args.revision,
            "cache_dir": args.cache_dir, "local_files_only": args.local_files_only}


def cmd_info(args) -> int:
    options = _source_options(args)
    from ..registry import is_registry_name, lookup

    if is_registry_name(args.name) and not (args.weight_name or args.subfolder):
        info = lookup(args.name).describe()  # no torch needed: answers in a fraction of a second
    else:
        from ..api import describe

        info = describe(args.name, **options)
    print(json.dumps(info, indent=2, default=str))
    return 0


def demo_adapter_path() -> Path:
    return Path(str(resources.files("clear_adapters").joinpath(DEMO_ADAPTER)))


def run_demo(out: str | Path, sizes=(128, 256), steps: int = 4, seed: int = 0, printer=print) -> list[dict]:
    """Full attention vs the bundled r=4 adapter on the tiny pipeline; returns the table rows."""
    import torch

    from .. import api
    from ..imaging import difference, psnr, side_by_side
    from ..testing import TINY_PIXELS_PER_TOKEN, tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)

    def generate(size):
        start = time.perf_counter()
        image = pipe(DEMO_PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                     generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]
        return image, time.perf_counter() - start

    for size in sizes:  # warm-up: first calls pay one-off allocation and tokenizer costs
        generate(size)
    full = {size: generate(size) for size in sizes}
    handle = api.load(demo_adapter_path(), pipe)
    clear = {}
    for size in sizes:
        generate(size)  # builds and caches the tile plan for this geometry
        clear[size] = generate(size)
    api.unload(pipe)
    rows = []
    for size in sizes:
        flops = handle.attention_flops(size, size, text_len=512)
        rows.append({"pixels": f"{size}x{size}", "tokens": flops["tokens"],
                     "grid": f"{size // TINY_PIXELS_PER_TOKEN}x{size // TINY_PIXELS_PER_TOKEN}",
                     "attn_gflops_full": flops["full_total"] * steps / 1e9,
                     "attn_gflops_clear": flops["clear_total"] * steps / 1e9, "flop_fraction": flops["fraction"],
                     "time_full_s": full[size][1], "time_clear_s": clear[size][1],
                     "psnr_db": psnr(clear[size][0], full[size][0])})
    printer(f"CLEAR demo: tiny FLUX pipeline (offline), adapter {DEMO_ADAPTER.split('/')[-1]} "
            f"(window {handle.config.window_size} tokens), {steps} steps, seed {seed}, prompt {DEMO_PROMPT!r}")
    header = f"{'image':>9} {'grid':>7} {'tokens':>7} {'attn GFLOP full':>16} {'CLEAR':>9} {'fraction':>9} " \
             f"{'time full':>10} {'CLEAR':>8} {'PSNR vs full':>13}"
    printer(header)
    for r in rows:
        printer(f"{r['pixels']:>9} {r['grid']:>7} {r['tokens']:>7} {r['attn_gflops_full']:>16.3f} "
                f"{r['attn_gflops_clear']:>9.3f} {r['flop_fraction']:>9.1%} {r['time_full_s']:>9.2f}s "
                f"{r['time_clear_s']:>7.2f}s {r['psnr_db']:>10.2f} dB")
    grid = side_by_side([[full[s][0], clear[s][0], difference(clear[s][0], full[s][0])] for s in sizes])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    printer(f"wrote {out} (rows: {', '.join(r['pixels'] for r in rows)}; columns: full | CLEAR | 4x difference)")
    return rows


def cmd_demo(args) -> int:
    from ..errors import InvalidArgumentError

    # options of the other bed are refused, not ignored
    if args.pipeline == "toy" and args.sizes is not None:
        raise InvalidArgumentError("--sizes is for --pipeline tiny; the toy was trained at 32 px (it runs at 32 px)")
    if args.pipeline == "tiny" and (args.prompt or args.adapter is not None):
        raise InvalidArgumentError("--prompt and --adapter are for the toy (the default --pipeline); the tiny "
                                   "pipeline runs its bundled adapter on a fixed prompt")
    if args.pipeline == "tiny":
        from ..testing import TINY_PIXELS_PER_TOKEN

        text = args.sizes or "128,256"
        sizes = tuple(int(s) for s in text.split(","))
        if any(size % TINY_PIXELS_PER_TOKEN for size in sizes):
            raise InvalidArgumentError(f"--sizes must be multiples of {TINY_PIXELS_PER_TOKEN} px (the tiny pipeline's "
                                       f"pixels per token), got {text}")
        run_demo(args.out, sizes, args.steps or 4, args.seed)
        return 0
    from ..toy.demo import DEMO_PROMPTS, run_toy_demo
    from ..toy.pipeline import STEPS

    run_toy_demo(args.out, args.prompt or DEMO_PROMPTS, adapter=args.adapter or "toy", steps=args.steps or STEPS,
                 seed=args.seed)
    return 0


def cmd_generate(args) -> int:
    import torch

    from .. import api
    from ..pipelines import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    # diffusers' per-step progress bar stays on (it shows on a terminal only)
    pipe = load_pipeline(args.model, device=device, dtype=dtype, progress=True)
    if args.adapter != "none":
        api.load(args.adapter, pipe, window_size=args.window_size, backend=args.backend,
                 proportional_attention=args.proportional_attention, **_source_options(args))
    start = time.perf_counter()
    image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, generator=torch.Generator(device="cpu").manual_seed(args.seed)).images[0]
    image.save(args.out)
    print(f"wrote {args.out} ({args.width}x{args.height}, {time.perf_counter() - start:.1f} s)")
    return 0
