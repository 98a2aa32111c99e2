"""Distil CLEAR r=16 for FLUX.1-dev on a GPU: a few dozen steps at 512² and 1024², s/step and peak memory.

    python examples/distill_flux.py --out runs/flux-r16                  # a CUDA GPU with FLUX.1-dev (Hub access)
    python examples/distill_flux.py --random-weights --out runs/shapes   # FLUX.1-dev shapes, random weights,
                                                                         # nothing downloaded (speed and memory)
    python examples/distill_flux.py --small --out runs/small             # tiny shapes on a CPU (the tests run it)
    accelerate launch --num_processes 4 examples/distill_flux.py ...     # several GPUs (DDP through accelerate)

For each resolution the script runs ``clear_adapters.distill.distill`` (teacher-generated data, CLEAR's loss,
AdamW, gradient checkpointing, bf16 autocast) into ``OUT/<height>x<width>`` and prints seconds per step
(training only; data generation and evaluation are reported apart), peak memory (CUDA: allocated by
torch; CPU: the process's peak RSS) and the error against the teacher before and after. Results also go
to ``OUT/results.json``. ``--random-weights`` builds the FLUX.1-dev transformer from its config with
random bf16 weights on the GPU (small text encoders with FLUX's output sizes and an 8x VAE), so the
numbers are those of the real shapes, while the errors mean nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import clear_adapters
from clear_adapters.distill import distill
from clear_adapters.pipelines import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_benchmark import FLUX_DEV_CONFIG, SMALL_CONFIG, build_transformer  # noqa: E402

FULL = dict(base="black-forest-labs/FLUX.1-dev", window=16.0, resolutions=[512, 1024], steps=30, samples=8,
            eval_samples=4, generation_steps=28, max_sequence_length=None, config=FLUX_DEV_CONFIG, vae_levels=4)
SMALL = dict(base="tiny (--small)", window=4.0, resolutions=[64, 96], steps=3, samples=4, eval_samples=2,
             generation_steps=2, max_sequence_length=64, config=SMALL_CONFIG, vae_levels=2)


def log(message: str) -> None:
    print(message, flush=True)


def random_pipeline(config: dict, vae_levels: int, device, dtype):
    """A FluxPipeline with a random-weight transformer of ``config`` and small random text encoders and VAE
    that produce what it expects (T5 width = joint_attention_dim, CLIP width = pooled_projection_dim,
    latent channels = in_channels / 4, ``2 ** (vae_levels - 1)`` pixels per latent)."""
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from clear_adapters.testing import tiny_flux_pipeline

    tiny = tiny_flux_pipeline()  # tokenizers and scheduler, built offline
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=128, hidden_size=config["pooled_projection_dim"],
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=config["joint_attention_dim"], d_ff=64, d_kv=8, num_layers=1,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels, block_out_channels=(8,) * vae_levels,
                        layers_per_block=1, latent_channels=config["in_channels"] // 4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    clip, t5, vae = (m.to(device=device, dtype=dtype).eval() for m in (clip, t5, vae))
    pipe = FluxPipeline(transformer=build_transformer(config, device, dtype), text_encoder=clip, text_encoder_2=t5,
                        vae=vae, tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2, scheduler=tiny.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="distill_flux", help="output folder (one adapter per resolution)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on any device: a smoke test")
    parser.add_argument("--random-weights", action="store_true",
                        help="FLUX.1-dev shapes with random weights (no download; speed and memory only)")
    parser.add_argument("--base", default=None, help="pipeline: Hub id or directory (default FLUX.1-dev)")
    parser.add_argument("--window", type=float, default=None)
    parser.add_argument("--resolutions", default=None, help="comma-separated square sizes in px")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="teacher-generated training samples")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "prodigy"])
    parser.add_argument("--device", default=None, help="default: cuda (cpu only with --small)")
    args = parser.parse_args(argv)

    preset = SMALL if args.small else FULL
    if args.device is None and not torch.cuda.is_available() and not args.small:
        log("CUDA is not available: FLUX.1-dev distillation needs a GPU (run with --small for a CPU smoke test).")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    window = args.window or preset["window"]
    sizes = [int(s) for s in args.resolutions.split(",")] if args.resolutions else preset["resolutions"]
    start = time.perf_counter()
    if args.small or args.random_weights:
        pipe = random_pipeline(preset["config"], preset["vae_levels"], device, dtype)
        base = preset["base"] if args.small else "FLUX.1-dev shapes, random weights"
    else:
        base = args.base or preset["base"]
        pipe = load_pipeline(base, device=str(device), dtype=dtype)
    log(f"pipeline {base} ready on {device} in {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    results = {"base": base, "window": window, "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "clear_adapters": clear_adapters.__version__, "runs": []}
    log(f"{'resolution':>10} {'tokens':>7} {'s/step':>8} {'peak GiB':>9} {'data s':>7} {'error before':>13} "
        f"{'after':>10}")
    for size in sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = distill(
            pipe, window, out=out / f"{size}x{size}", resolution=size, steps=args.steps or preset["steps"],
            samples=args.samples or preset["samples"], eval_samples=preset["eval_samples"],
            generation_steps=preset["generation_steps"], max_sequence_length=preset["max_sequence_length"],
            optimizer=args.optimizer, checkpoint_every=10_000, overwrite=True, device=device, progress=None,
            base_name=None if args.small or args.random_weights else base)
        tokens = (size // (2 * pipe.vae_scale_factor)) ** 2
        run = {"resolution": size, "image_tokens": tokens, "seconds_per_step": report["seconds_per_step"],
               "peak_memory_gib": peak_memory_gib(device), "data_time_s": report["data_time_s"],
               "error_before": report["error_before"], "error_after": report["error_after"],
               "steps": report["steps"]}
        results["runs"].append(run)
        log(f"{size:>8}px {tokens:>7} {run['seconds_per_step']:>8.2f} {run['peak_memory_gib']:>9.1f} "
            f"{run['data_time_s']:>7.0f} {run['error_before']:>13.4g} {run['error_after']:>10.4g}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
