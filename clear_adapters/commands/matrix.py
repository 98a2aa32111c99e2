"""``clear-adapters matrix``: CLEAR vs full attention across FLUX variants and plugins."""

from __future__ import annotations

from . import argtypes
from .common import add_threads_argument

#: Plugin resources a real pipeline needs, as (option, metavar, help); each may be given several times.
RESOURCE_OPTIONS = [
    ("lora", "SOURCE", "FLUX LoRA (dir, .safetensors, Hub id or owner/repo/file); twice for two adapters"),
    ("controlnet", "ID", "FLUX ControlNet for Canny edges (twice for the multi case)"),
    ("controlnet-union", "ID", "FLUX ControlNet-Union model"),
    ("ip-adapter", "SOURCE", "FLUX IP-Adapter (owner/repo/file.safetensors or dir)"),
    ("image-encoder", "ID", "CLIP image encoder of the IP-Adapter"),
    ("kontext", "ID", "FLUX.1-Kontext pipeline"),
    ("fill", "ID", "FLUX.1-Fill pipeline"),
    ("schnell", "ID", "FLUX.1-schnell pipeline"),
    ("variant", "ID", "a fine-tuned FLUX.1-dev pipeline (replace and delta cases)"),
    ("base", "ID", "base model for weight_mode='delta' (default: the adapter's base_model)"),
    ("image", "PATH", "condition image for ControlNet/Kontext/Fill/Img2Img/IP-Adapter (default: a drawn one)"),
]


def register(subparsers) -> None:
    """Add ``matrix`` to the CLI."""
    p = subparsers.add_parser(
        "matrix", help="compatibility matrix: CLEAR vs full attention with LoRA, ControlNet, IP-Adapter, variants",
        description="Runs every compatibility case with full attention and with CLEAR on the same seed and writes "
                    "OUT/matrix.json, OUT/matrix.md and OUT/index.html (one labelled row per case with its inputs "
                    "and images, in OUT/images). Exit code 1 when a case "
                    "fails. Cases that need plugin weights on a real pipeline are reported as skipped with the option "
                    "they need.")
    p.add_argument("--pipeline", default="toy",
                   help="'toy' (the trained miniature FLUX shipped in the package, with its trained plugins; default), "
                        "'tiny' (random-weight mechanics bed: every plugin and variant case) or a FLUX pipeline id/dir")
    p.add_argument("--adapter", default=None, help="CLEAR adapter (default: toy -> toy/r4; tiny -> a checkpoint "
                                                   "written for the tiny pipeline; otherwise flux-dev)")
    p.add_argument("--cases", default=None, help="comma-separated case names, plugin names or globs "
                                                 "(default: toy/* on the toy, all the others elsewhere)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", default="clear_matrix", help="output directory")
    p.add_argument("--window-size", type=argtypes.window, default=None)
    p.add_argument("--height", type=argtypes.positive_int, default=None)
    p.add_argument("--width", type=argtypes.positive_int, default=None)
    p.add_argument("--steps", type=argtypes.positive_int, default=None)
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0)
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-sequence-length", type=argtypes.positive_int, default=None,
                   help="T5 tokens (tiny and toy default 32)")
    p.add_argument("--min-psnr", type=argtypes.finite, default=None,
                   help="pass threshold, dB (written into the report)")
    p.add_argument("--min-ssim", type=argtypes.finite, default=None, help="pass threshold (written into the report)")
    p.add_argument("--exact-tolerance", type=argtypes.non_negative, default=None,
                   help="max |difference| for 'equal' images (default 1e-5 in float32, 5e-2 in bf16/fp16)")
    p.add_argument("--device", type=argtypes.device, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    add_threads_argument(p)
    for name, metavar, help_text in RESOURCE_OPTIONS:
        p.add_argument(f"--{name}", action="append", default=None, metavar=metavar, help=help_text)
    p.set_defaults(func=cmd_matrix)


def cmd_matrix(args) -> int:
    from ..compat import discover_cases, run_matrix

    if args.list:
        for case in discover_cases():
            print(f"{case.name:<32} {case.plugin:<11} {case.description}")
        return 0
    from ..pipelines import check_source

    check_source(args.pipeline)  # a missing pipeline is one error, not a report of failed cases
    thresholds = {k: v for k, v in (("min_psnr", args.min_psnr), ("min_ssim", args.min_ssim),
                                    ("exact_tolerance", args.exact_tolerance)) if v is not None}
    resources = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in RESOURCE_OPTIONS}
    window = args.window_size
    if window is not None and float(window).is_integer():
        window = int(window)
    report = run_matrix(args.pipeline, args.adapter, out=args.out,
                        cases=args.cases.split(",") if args.cases else None, window_size=window,
                        height=args.height, width=args.width, steps=args.steps, seed=args.seed, prompt=args.prompt,
                        max_sequence_length=args.max_sequence_length,
                        resources=resources, thresholds=thresholds, device=args.device, dtype=args.dtype,
                        threads=args.threads)
    return 0 if report["passed"] else 1
