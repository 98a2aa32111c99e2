"""``clear-adapters distill``: make a CLEAR adapter for a FLUX pipeline (the trainer is :mod:`clear_adapters.distill`).

Multi-GPU: ``accelerate launch --num_processes N -m clear_adapters.cli distill ...``.
"""

from __future__ import annotations

import json
import os
import time

#: Defaults per built-in base (what ``--base tiny`` needs to finish in well under a minute on 2 CPU cores
#: and show the mechanics). The tiny pipeline has random weights: its predictions are no flow, so the
#: flow-matching term would pull the student away from the teacher; it trains on the teacher terms only.
PRESETS = {
    "tiny": dict(resolution=[(64, 64)], steps=40, batch_size=4, lr=3e-3, loss_weights=(0.0, 1.0, 0.5),
                 samples=16, eval_samples=8, generation_steps=4, max_sequence_length=64, checkpoint_every=20,
                 gradient_checkpointing=False),
    # The trained toy (clear_adapters.toy, 32 px): its own captions, sampled as it was trained (8 steps, 32
    # T5 tokens). examples/toy/train.py makes the shipped toy/r4 and toy/r2 with exactly these settings.
    "toy": dict(resolution=[(32, 32)], steps=400, batch_size=16, lr=1e-3, samples=512, eval_samples=16,
                generation_steps=8, max_sequence_length=32, checkpoint_every=100, gradient_checkpointing=False),
}
#: Training prompts per built-in base when --prompts is not given ("module:function" returning a list).
DEFAULT_PROMPTS = {"toy": "clear_adapters.toy.data:distill_prompts"}
#: torch CPU threads per built-in base: the tiny model is overhead-bound, and on a busy 2-core machine two
#: OpenMP threads spin against each other (measured here: 1 thread ~0.4 s/step, 2 threads 1-3 s/step)
THREADS = {"tiny": 1, "toy": 1}
#: Defaults for every other base (FLUX.1-dev scale): CLEAR's loss, 1024 px.
GENERAL = dict(resolution=[(1024, 1024)], steps=1000, batch_size=1)


def register(sub) -> None:
    from .common import add_threads_argument

    p = sub.add_parser("distill", help="distil a CLEAR adapter for a FLUX pipeline (teacher: the same model)",
                       description="Train the attention projections of a FLUX model with the CLEAR pattern against "
                                   "the same model with full attention; writes an adapter directory that "
                                   "`clear-adapters push` and clear_adapters.load() accept, plus report.json "
                                   "and loss.png. Defaults for --base tiny: "
                                   + ", ".join(f"{k}={v}" for k, v in PRESETS["tiny"].items()) + ". For --base "
                                   "toy: " + ", ".join(f"{k}={v}" for k, v in PRESETS["toy"].items())
                                   + ", prompts: the toy's own captions.")
    p.add_argument("--base", required=True, help="'tiny', 'toy', a pipeline directory or a Hub model id")
    p.add_argument("--window", type=float, required=True, help="window radius r in latent tokens")
    p.add_argument("--down", type=int, default=1, help="K/V down factor d (default 1: purely local, linear)")
    p.add_argument("--out", required=True, help="output directory (becomes the adapter directory)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--prompts", metavar="FILE", help="training prompts, one per line (default: a built-in list)")
    data.add_argument("--data", metavar="DIR", help="images (+ same-name .txt captions) instead of generated data")
    p.add_argument("--self-generate", type=int, metavar="N", dest="samples",
                   help="number of teacher-generated training samples (default: one per prompt and resolution)")
    p.add_argument("--resolution", nargs="+", action="append", metavar="H W",
                   help="training size(s) in pixels: pairs 'H W' or 'HxW'; repeatable (mixed sizes allowed)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, dest="batch_size")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float, help="default 1e-4 (AdamW) or 1.0 (Prodigy)")
    p.add_argument("--optimizer", choices=["adamw", "prodigy"])
    p.add_argument("--loss-weights", type=float, nargs=3, metavar=("FM", "PRED", "ATTN"),
                   help="weights of the flow-matching, prediction and attention-output losses (default 1 0.5 0.5)")
    p.add_argument("--attn-every", type=int, dest="attn_loss_every",
                   help="attention loss on single blocks 0, K, 2K, ... (default 4)")
    p.add_argument("--guidance", type=float, help="default: the pipeline's (3.5 for FLUX.1-dev)")
    p.add_argument("--max-sequence-length", type=int, help="text tokens (default: the pipeline's, 512 for FLUX)")
    p.add_argument("--generation-steps", type=int, help="sampler steps of the teacher for self-generated data")
    p.add_argument("--eval-samples", type=int, help="held-out items for error_before/error_after (default 8)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    p.add_argument("--backend", choices=["auto", "dense", "tiled", "flex"])
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (or an output directory holding one)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter or run already in --out")
    p.add_argument("--cache-dir", help="where generated data is cached (default OUT/cache)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--revision", help="Hub revision of --base")
    add_threads_argument(p)  # default for --base tiny: THREADS
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_distill)


def parse_resolutions(groups) -> list[tuple[int, int]] | None:
    """``[["512", "512"], ["1024x768"]]`` -> ``[(512, 512), (1024, 768)]``."""
    from ..errors import DistillationError

    if not groups:
        return None
    numbers = []
    for token in (t for group in groups for t in group):
        parts = token.lower().split("x") if "x" in token.lower() else [token]
        try:
            numbers += [int(v) for v in parts]
        except ValueError:
            raise DistillationError(f"--resolution: {token!r} is not a number of pixels") from None
    if len(numbers) % 2:
        raise DistillationError(f"--resolution takes pairs 'H W' (or 'HxW'), got {len(numbers)} numbers")
    return [(numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2)]


def cmd_distill(args) -> int:
    import torch

    from ..distill import Distiller, DistillSettings
    from ..distill_data import read_prompt_file
    from ..pipelines import load_pipeline
    from .common import torch_threads

    started = time.perf_counter()
    options = dict(PRESETS.get(args.base, GENERAL))
    for name in ("steps", "batch_size", "grad_accum", "lr", "optimizer", "attn_loss_every", "guidance",
                 "max_sequence_length", "generation_steps", "eval_samples", "checkpoint_every",
                 "gradient_checkpointing", "backend", "seed", "samples"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.optimizer == "prodigy" and args.lr is None:
        options.pop("lr", None)  # Prodigy sets its own step size: its lr is a multiplier (default 1.0)
    if args.loss_weights is not None:
        options["loss_weights"] = tuple(args.loss_weights)
    resolutions = parse_resolutions(args.resolution)
    if resolutions is not None:
        options["resolution"] = resolutions
    # cheap checks first: nothing is loaded before the settings and the prompt file are known to be good
    settings = DistillSettings(args.window, down_factor=args.down, **options)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if prompts is None and args.data is None and args.base in DEFAULT_PROMPTS:
        import importlib

        module, function = DEFAULT_PROMPTS[args.base].split(":")
        prompts = getattr(importlib.import_module(module), function)()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and os.environ.get("LOCAL_RANK"):  # one process per GPU under accelerate launch/torchrun
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")  # as --help says; fp16 files too
    # an explicit --threads is applied by cli.main around the whole command; this is the preset's default
    with torch_threads(THREADS.get(args.base) if args.threads is None else None):
        pipe = load_pipeline(args.base, device=device, dtype=dtype, revision=args.revision)
        run = Distiller(pipe, settings, out=args.out, prompts=prompts, data_dir=args.data, cache_dir=args.cache_dir,
                        resume=args.resume, overwrite=args.overwrite, device=device,
                        progress=False if args.quiet else None, base_name=args.base, base_revision=args.revision)
        with run:
            report = run.run_all()
    total = time.perf_counter() - started
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "loss_history"}, indent=2))
        return 0
    if run.accelerator.is_main_process:
        reduction = report["error_reduction"]
        print(f"distilled CLEAR r={settings.window_size:g}"
              + (f" d={settings.down_factor}" if settings.down_factor > 1 else "")
              + f" for {args.base}: {report['steps']} steps in {report['train_time_s']:.1f} s "
                f"({report['seconds_per_step']:.2f} s/step), {total:.1f} s in all")
        print(f"error vs teacher (held-out): {report['error_before']:.4g} -> {report['error_after']:.4g}"
              + (f" ({reduction:.0%} lower)" if reduction is not None else ""))
        print(f"wrote {args.out} (adapter, report.json, loss.png); load it with clear_adapters.load({args.out!r}, "
              f"pipe) or publish it with: clear-adapters push {args.out} OWNER/NAME")
    return 0
