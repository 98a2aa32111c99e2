"""GPU check of multi-process CLEAR on one GPU: the single-GPU path, a 1-rank xfuser run and 1-rank halo.

    python examples/gpu_xdit.py --out gpu_xdit.json          # one CUDA GPU (H100/H200)
    python examples/gpu_xdit.py --small --out s.json         # tiny shapes on the CPU (the tests run this)

Runs in one process (a process group of one rank is formed here; under torchrun the launcher's is
used). Nothing is downloaded:

1. A FluxTransformer2DModel with FLUX.1-dev's config and random bf16 weights (``gpu_benchmark.py``),
   CLEAR attached (window 16), at 128x128 latent tokens (a 2K image) + 512 text tokens: the
   single-GPU forward time, then the same forward through halo mode (1 rank) and through
   ``clear_adapters.integrations.xdit`` with xfuser's ``ulysses_degree=1`` (xfuser's wrapper, USP and
   the registered CLEAR attention function): forward times and the max difference to single-GPU CLEAR,
   relative to the output's largest value (bf16: a few 1e-3 is rounding).
2. The tiny pipeline of ``clear_adapters.testing`` in float32 through both modes against single-process
   CLEAR (``max_diff`` must be <= 1e-5): exactness with the CUDA kernels (flex).

Needs diffusers and xfuser 0.7.x (with yunchang, DistVAE); docs/MULTI_GPU.md says how to carry them to
a machine without a package index. Without CUDA (and without --small) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FULL = dict(grid=(128, 128), text=512, window=16.0, repeats=3, tolerance=3e-2)
SMALL = dict(grid=(12, 10), text=8, window=3.0, repeats=1, tolerance=1e-4)


def _gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", HERE / "gpu_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    print(message, flush=True)


def single_rank_group(backend: str) -> None:
    """Form a one-process group unless a launcher (torchrun) set one up."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from clear_adapters.integrations.halo import init_distributed

    init_distributed(backend, timeout_s=600)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def run_transformer(preset, config, device, dtype, skip_xfuser: bool) -> dict:
    import clear_adapters
    from clear_adapters.integrations import halo, xdit

    bench = _gpu_benchmark()
    start = time.perf_counter()
    model = bench.build_transformer(config, device, dtype)
    log(f"built FluxTransformer2DModel ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{dtype}) in {time.perf_counter() - start:.1f} s")
    clear_adapters.attach(model, preset["window"])
    inputs = bench.transformer_inputs(config, preset["grid"], preset["text"], device, dtype)
    results = {"grid": list(preset["grid"]), "text": preset["text"], "window": preset["window"]}
    seconds, times, peak = bench.timed(model, inputs, device, preset["repeats"])
    reference = bench.forward(model, inputs)
    results["single"] = dict(seconds=seconds, times=times, peak_bytes=peak)
    log(f"single-GPU CLEAR: {seconds * 1e3:.0f} ms per forward")

    handle = halo.apply(model)
    seconds, times, peak = bench.timed(model, inputs, device, preset["repeats"])
    out = bench.forward(model, inputs)
    handle.remove()
    results["halo"] = dict(seconds=seconds, times=times, peak_bytes=peak, relative_diff=relative(out, reference))
    log(f"halo, 1 rank: {seconds * 1e3:.0f} ms per forward, relative max difference {relative(out, reference):.2e}")

    if not skip_xfuser:
        from xfuser.config import xFuserArgs

        engine_config, _ = xFuserArgs(model="flux-random-weights", ulysses_degree=1).create_config()
        handle = xdit.apply(model, engine_config)
        seconds, times, peak = bench.timed(model, inputs, device, preset["repeats"])
        out = bench.forward(model, inputs)
        calls = handle.stats.attention_calls
        handle.remove()
        results["xfuser"] = dict(seconds=seconds, times=times, peak_bytes=peak, relative_diff=relative(out, reference),
                                 attention_calls=calls)
        log(f"xfuser (ulysses_degree=1), 1 rank: {seconds * 1e3:.0f} ms per forward, relative max difference "
            f"{relative(out, reference):.2e} ({calls} CLEAR attention calls through USP)")
    del model
    return results


def run_tiny_exactness(device, skip_xfuser: bool) -> dict:
    """The tiny pipeline in float32 through each mode vs single-process CLEAR (max abs difference)."""
    import clear_adapters
    from clear_adapters.integrations import halo, xdit
    from clear_adapters.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(0).to(device)
    clear_adapters.attach(pipe, 4)
    kwargs = dict(prompt="a photo of a cat", height=128, width=96, num_inference_steps=2, max_sequence_length=16,
                  output_type="pt")

    def generate():
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    reference = generate()
    results = {}
    modes = [("halo", lambda: halo.apply(pipe))]
    if not skip_xfuser:
        modes.append(("xfuser", lambda: xdit.apply(pipe)))  # xfuser's groups exist from the transformer run
    for name, apply in modes:
        handle = apply()
        results[name] = float((generate() - reference).abs().max())
        handle.remove()
        log(f"tiny pipeline, float32, {name}: max abs difference vs single-process CLEAR {results[name]:.2e}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_xdit.json")
    parser.add_argument("--small", action="store_true", help="tiny shapes (runs on a CPU)")
    parser.add_argument("--grid", default=None, help="HxW latent tokens (default 128x128; --small 12x10)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-xfuser", action="store_true", help="single-GPU and halo only")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        log("no CUDA device: nothing to measure (use --small for the CPU mechanics check)")
        return 0
    preset = dict(SMALL if args.small else FULL)
    if args.grid:
        preset["grid"] = tuple(int(v) for v in args.grid.lower().split("x"))
    if args.repeats:
        preset["repeats"] = args.repeats
    if not cuda and not args.skip_xfuser:
        sys.path.insert(0, str(HERE.parent / "tests"))
        import xfuser_cpu  # CPU harness for xfuser's accelerator probes (tests only)

        xfuser_cpu.install()
    single_rank_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and not args.small else torch.float32
    bench = _gpu_benchmark()
    config = bench.SMALL_CONFIG if args.small else bench.FLUX_DEV_CONFIG
    log(f"== {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}")
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "transformer": run_transformer(preset, config, device, dtype, args.skip_xfuser),
               "tiny_float32": run_tiny_exactness(device, args.skip_xfuser)}
    failures = [f"{mode}: relative difference {results['transformer'][mode]['relative_diff']:.3g}"
                for mode in ("halo", "xfuser") if mode in results["transformer"]
                and not results["transformer"][mode]["relative_diff"] <= preset["tolerance"]]
    failures += [f"tiny {mode}: {diff:.3g}" for mode, diff in results["tiny_float32"].items() if not diff <= 1e-5]
    results["failures"] = failures
    Path(args.out).write_text(json.dumps(results, indent=2))
    log(f"wrote {args.out}" + (f"; FAILED: {'; '.join(failures)}" if failures else "; all checks passed"))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
