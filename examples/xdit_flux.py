"""Multi-process CLEAR inference: xDiT (xfuser) Ulysses or ring, or the exact halo mode.

    torchrun --nproc_per_node=N examples/xdit_flux.py --pipeline tiny|<dir or Hub id> [--adapter NAME]
        --mode ulysses|ring|halo --height H --width W [--check]

* ``--pipeline tiny`` (default) builds the random-weight tiny FLUX pipeline of ``clear_adapters.testing``
  and writes a reference-format CLEAR checkpoint for it (``--window``, ``--down-factor``); runs on CPU
  (gloo). ``--pipeline black-forest-labs/FLUX.1-dev --adapter flux-dev`` on GPUs (nccl, bfloat16).
* ``--check`` first runs the same generation as single-process CLEAR on every rank, then compares:
  max abs difference of the images (or latents with ``--output-type latent``), exit code 1 above
  ``--tolerance`` (1e-5 in float32). The tiny pipeline's VAE has full self-attention: above ~512 px use
  ``--output-type latent``.
* Every run prints the wall time, the bytes each rank sent per attention layer (counted where the
  communication is issued; the test-suite checks these counts against torch's profiler) and the
  formula for every mode at this size.

Without CUDA, ulysses/ring load the CPU harness in ``tests/xfuser_cpu.py`` (xfuser probes for an
accelerator at import); halo never imports xfuser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="tiny", help="tiny, a pipeline directory or a Hub id")
    parser.add_argument("--adapter", default=None,
                        help="registry name, Hub id or file; default: flux-dev, or a generated one for tiny")
    parser.add_argument("--mode", required=True, choices=("ulysses", "ring", "halo"))
    parser.add_argument("--ulysses-degree", type=int, default=1,
                        help="with --mode ring: Ulysses inside each ring group (xfuser's USP hybrid); the ring "
                             "degree is the number of processes divided by this")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--window", type=float, default=4, help="window of the generated tiny adapter (tokens)")
    parser.add_argument("--down-factor", type=int, default=1, help="down factor of the generated tiny adapter")
    parser.add_argument("--steps", type=int, default=None, help="default: 2 for tiny, 28 otherwise")
    parser.add_argument("--prompt", default="a photo of a red fox in the snow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--output-type", default="pt", choices=("pt", "latent"),
                        help="latent: skip the VAE (compare and time the denoising only)")
    parser.add_argument("--check", action="store_true", help="compare with single-process CLEAR")
    parser.add_argument("--tolerance", type=float, default=None, help="default: 1e-5 in float32, else 0.05")
    parser.add_argument("--timeout", type=float, default=600, help="process-group timeout in seconds")
    parser.add_argument("--out", default=None, help="rank 0 saves the image here")
    parser.add_argument("--json", default=None, help="rank 0 writes the measurements here")
    return parser.parse_args(argv)


def generate(pipe, args, steps):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        images = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=steps,
                      max_sequence_length=args.max_sequence_length, output_type=args.output_type,
                      generator=torch.Generator().manual_seed(args.seed)).images
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def load_clear(pipe, args, tmp):
    import clear_adapters
    from clear_adapters.testing import write_reference_checkpoint

    if args.adapter is None and args.pipeline == "tiny":
        path = write_reference_checkpoint(Path(tmp) / "clear_tiny.safetensors", pipe.transformer, args.window,
                                          down_factor=args.down_factor)
        return clear_adapters.load(str(path), pipe, window_size=args.window, down_factor=args.down_factor)
    return clear_adapters.load(args.adapter or "flux-dev", pipe)


def apply_mode(pipe, args, world):
    import torch

    if args.mode == "halo":
        from clear_adapters.integrations import halo

        return halo.apply(pipe)
    from xfuser.config import xFuserArgs

    from clear_adapters.integrations import xdit

    if args.mode == "ulysses":
        degrees = dict(ulysses_degree=world)
    else:
        degrees = dict(ulysses_degree=args.ulysses_degree, ring_degree=world // args.ulysses_degree)
    # xfuser's own attention backend never runs (CLEAR covers every layer), but xfuser refuses ring with its
    # CPU default (SDPA); name one it accepts
    backend = None if torch.cuda.is_available() or args.mode == "ulysses" else "SDPA_FLASH"
    engine_config, _ = xFuserArgs(model=args.pipeline, attention_backend=backend, **degrees).create_config()
    return xdit.apply(pipe, engine_config)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.mode != "halo" and not cuda:
        sys.path.insert(0, str(REPO / "tests"))
        import xfuser_cpu  # the CPU harness: patches xfuser's accelerator probes (tests only, never the library)

        os.environ.setdefault("XDIT_LOGGING_LEVEL", "WARNING")
        xfuser_cpu.install()
    import torch.distributed as dist

    from clear_adapters.integrations.halo import bytes_per_layer, init_distributed
    from clear_adapters.pipelines import load_pipeline

    init_distributed(timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    steps = args.steps or (2 if args.pipeline == "tiny" else 28)
    tolerance = args.tolerance if args.tolerance is not None else (1e-5 if dtype == torch.float32 else 0.05)

    builtin_dtype = args.pipeline == "tiny" and dtype == torch.float32  # built in float32 already
    pipe = load_pipeline(args.pipeline, device=device, dtype=None if builtin_dtype else dtype)
    with tempfile.TemporaryDirectory() as tmp:
        clear = load_clear(pipe, args, tmp)
    reference, reference_s = generate(pipe, args, steps) if args.check else (None, None)
    handle = apply_mode(pipe, args, world)
    handle.stats.reset()
    images, seconds = generate(pipe, args, steps)

    transformer = pipe.transformer
    pixels = getattr(pipe, "vae_scale_factor", 8) * 2
    rows, cols = args.height // pixels, args.width // pixels
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    size = dict(height=rows, width=cols, text_len=args.max_sequence_length, heads=heads, head_dim=head_dim,
                ranks=world, window_size=clear.config.window_size, down_factor=clear.config.down_factor,
                element_size=torch.finfo(dtype).bits // 8)
    formulas = {mode: bytes_per_layer(mode, **size) for mode in ("halo", "ulysses", "ring")
                if not (mode == "ring" and clear.config.down_factor > 1)}
    if args.ulysses_degree > 1 and args.mode == "ring":  # the hybrid has no formula of its own here
        formulas.pop("ring", None)
    difference = float((images.float() - reference.float()).abs().max()) if reference is not None else None
    mine = dict(rank=rank, bytes_per_layer=handle.stats.bytes_per_layer, attention_calls=handle.stats.attention_calls,
                other_bytes=handle.stats.other_bytes, seconds=seconds, difference=difference)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    failed = difference is not None and not difference <= tolerance
    flag = torch.tensor([int(failed)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)

    if rank == 0:
        backend = dist.get_backend()
        mode = f"{args.mode} x ulysses {args.ulysses_degree}" if args.ulysses_degree > 1 else args.mode
        print(f"mode {mode}, {world} ranks ({backend}), {args.height}x{args.width} px = {rows}x{cols} tokens "
              f"+ {args.max_sequence_length} text, window {clear.config.window_size:g}, down factor "
              f"{clear.config.down_factor}, {str(dtype).replace('torch.', '')}, {steps} steps")
        print(f"wall time: {max(r['seconds'] for r in everyone):.2f} s"
              + (f"   (single-process CLEAR on one rank: {reference_s:.2f} s)" if reference_s else ""))
        per_rank = "   ".join(f"rank {r['rank']}: {r['bytes_per_layer']:,.0f}" for r in everyone)
        print(f"bytes sent per attention layer per rank (counted): {per_rank}")
        print("formula, busiest rank: " + " | ".join(f"{m} {b:,}" for m, b in formulas.items()))
        if "ulysses" in formulas and formulas["ulysses"]:
            print(f"halo / ulysses (formula): {formulas['halo'] / formulas['ulysses']:.3f}")
        if args.check:
            worst = max(r["difference"] for r in everyone)
            print(f"max abs difference vs single-process CLEAR: {worst:.3g} (tolerance {tolerance:g}): "
                  f"{'FAILED' if flag.item() else 'OK'}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(args=vars(args), ranks=everyone, formulas=formulas,
                                                       tokens=[rows, cols], failed=bool(flag.item())), indent=2))
    if args.out and rank == 0 and args.output_type == "pt":
        from PIL import Image

        array = (images[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(args.out)
    handle.remove()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main())
