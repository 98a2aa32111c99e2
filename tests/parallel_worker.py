"""One rank of the multi-process tests (tests/test_parallel.py starts 2 of them with gloo on CPU).

    python tests/parallel_worker.py OUT_DIR        (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)

The processes start once (imports are most of the cost) and check many cases; rank r writes
OUT_DIR/rank{r}.json. In order:
1. halo, on plain torch.distributed with xfuser made unimportable: halo vs single-process CLEAR on many
   geometries and a whole tiny pipeline, byte counts vs the profiler, refusals;
2. xfuser through the CPU harness (tests/xfuser_cpu.py): refusals, Ulysses, then ring (and halo on
   xfuser's groups), each vs single-process CLEAR, byte counts vs the profiler;
3. diffusers' own context parallelism on a CLEAR model: a clear error, in either order;
4. rank 1 dies in the middle of a halo run: rank 0 must get a ParallelError, not hang.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TIMEOUT_S = float(os.environ.get("CLEAR_TEST_PG_TIMEOUT", "60"))


def tiny_inputs(transformer, height, width, text_len=7, batch=1, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    config = transformer.config
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(hidden_states=torch.randn(batch, height * width, config.in_channels, generator=gen),
                encoder_hidden_states=torch.randn(batch, text_len, config.joint_attention_dim, generator=gen),
                pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=gen),
                timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                img_ids=img_ids, txt_ids=torch.zeros(text_len, 3), return_dict=False)


def tiny_clear_transformer(tmp, window, down, seed=0, proportional=False):
    """A tiny FLUX transformer with an upstream-format CLEAR checkpoint loaded (noisy pooling weights)."""
    import clear_adapters
    from clear_adapters.testing import tiny_flux_transformer, write_reference_checkpoint

    transformer = tiny_flux_transformer(seed)
    path = write_reference_checkpoint(Path(tmp) / f"clear_{window}_{down}.safetensors", transformer, window,
                                      down_factor=down, seed=seed)
    clear_adapters.load(str(path), transformer, window_size=window, down_factor=down,
                        proportional_attention=proportional)
    return transformer


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------- halo
HALO_CASES = [
    # (grid rows, grid cols, window, down factor, bands or None, batch, proportional)
    (13, 10, 4, 1, None, 1, False),      # odd non-square grid; boundary at row 7, not a multiple of r
    (9, 12, 3.5, 1, [2, 7], 2, True),    # a band shorter than the halo, batch 2, proportional scale
    (6, 11, 2, 1, [5, 1], 1, False),     # one-row band
    (16, 12, 4, 4, None, 1, False),      # d = 4, bands of whole 4-row blocks
    (12, 8, 3, 4, [4, 8], 1, True),      # d = 4, unequal bands, proportional scale with log(10 N)
    (10, 10, 30, 1, None, 1, False),     # window larger than the image: every rank sees the whole image
]


def run_halo(results, rank, tmp):
    import torch

    import clear_adapters
    from clear_adapters.integrations import halo
    from clear_adapters.testing import tiny_flux_pipeline

    cases = []
    for rows, cols, window, down, bands, batch, proportional in HALO_CASES:
        transformer = tiny_clear_transformer(tmp, window, down, proportional=proportional)
        inputs = tiny_inputs(transformer, rows, cols, batch=batch)
        with torch.no_grad():
            reference = transformer(**inputs)[0]
            handle = halo.apply(transformer, bands=bands)
            out = transformer(**inputs)[0]
            handle.remove()
            after = transformer(**inputs)[0]
        cases.append(dict(grid=[rows, cols], window=window, down=down, bands=bands, batch=batch,
                          max_diff=max_diff(out, reference), after_remove=max_diff(after, reference),
                          shape_ok=list(out.shape) == list(reference.shape)))
    results["halo_cases"] = cases

    # refusals come before any change, on every rank
    errors = {}
    hooks_before = (len(transformer._forward_pre_hooks), len(transformer._forward_hooks))
    bare = tiny_flux_pipeline(0)
    for name, call in [("no_clear", lambda: halo.apply(bare)),
                       ("bands_per_rank", lambda: halo.apply(transformer, bands=[1, 2, 3])),
                       ("ranks_disagree", lambda: halo.apply(transformer, bands=[5, 5] if rank == 0 else [4, 6]))]:
        try:
            call()
            errors[name] = None
        except halo.ParallelError as exc:
            errors[name] = str(exc)
    errors["unchanged"] = transformer._clear_context.sequence_parallel is None and \
        (len(transformer._forward_pre_hooks), len(transformer._forward_hooks)) == hooks_before
    results["halo_errors"] = errors

    # the whole pipeline, as the example runs it: 128 x 96 px = 32 x 24 tokens
    pipe = tiny_flux_pipeline(0)
    clear_adapters.attach(pipe, 4)
    kwargs = dict(prompt="a photo of a cat", height=128, width=96, num_inference_steps=2, max_sequence_length=16,
                  output_type="pt")
    with torch.no_grad():
        reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        handle = halo.apply(pipe)
        image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    results["halo_pipeline"] = dict(max_diff=max_diff(image, reference), per_layer=handle.stats.bytes_per_layer)

    # byte counts: what the strategy counted vs what torch.distributed sent (the profiler's view)
    from comm_measure import measure_attention_bytes

    handle.stats.reset()
    transformer = pipe.transformer
    inputs = tiny_inputs(transformer, 32, 24, text_len=16)
    with torch.no_grad():
        measured = measure_attention_bytes(lambda: transformer(**inputs), ranks=2)
    results["halo_bytes"] = dict(counted=handle.stats.bytes_per_layer, measured=measured["bytes_per_call"],
                                 calls=measured["calls"], counted_calls=handle.stats.attention_calls,
                                 formula=halo.bytes_per_layer("halo", height=32, width=24, text_len=16, heads=2,
                                                              head_dim=16, ranks=2, window_size=4,
                                                              element_size=4))
    handle.remove()
    clear_adapters.unload(pipe)


def run_diffusers_cp(results):
    """diffusers' own context parallelism on a CLEAR model: a clear error, in either order.

    diffusers builds its device mesh on an accelerator (``rank % torch.accelerator.device_count()``);
    on this CPU machine the count is patched to 1 for the call, everything else is diffusers' code.
    """
    import torch
    from diffusers import ContextParallelConfig

    import clear_adapters
    from clear_adapters.testing import tiny_flux_pipeline

    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        errors = []
        pipe = tiny_flux_pipeline(0)
        clear_adapters.attach(pipe, 4)
        try:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
            with torch.no_grad():
                pipe.transformer(**tiny_inputs(pipe.transformer, 8, 8, text_len=8))
            errors.append(None)
        except clear_adapters.ClearAdapterError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - report what diffusers did instead
            errors.append(f"unexpected {type(exc).__name__}: {exc}")
        pipe = tiny_flux_pipeline(0)
        try:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
            clear_adapters.attach(pipe, 4)
            errors.append(None)
        except clear_adapters.ClearAdapterError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"unexpected {type(exc).__name__}: {exc}")
        results["diffusers_cp"] = errors
    finally:
        torch.accelerator.device_count = count


def run_dead_rank(results, rank, tmp):
    """Rank 1 dies while rank 0 runs a halo forward: rank 0 must raise ParallelError, quickly."""
    import torch

    from clear_adapters.integrations import halo

    transformer = tiny_clear_transformer(tmp, 3, 1)
    inputs = tiny_inputs(transformer, 8, 6)
    halo.apply(transformer)
    if rank == 1:
        results["dead_rank"] = "exiting"
        write(results, rank)
        os._exit(17)
    start = time.time()
    try:
        with torch.no_grad():
            transformer(**inputs)
        results["dead_rank"] = dict(error=None)
    except halo.ParallelError as exc:
        results["dead_rank"] = dict(error=str(exc), seconds=time.time() - start)


# ----------------------------------------------------------------------------------------------- xdit
def run_xdit(results, rank, tmp):
    import xfuser_cpu

    xfuser_cpu.install()  # after halo's checks: xfuser was unimportable until now
    import torch
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import parallel_state, runtime_state

    import clear_adapters
    from clear_adapters.integrations import halo, xdit
    from clear_adapters.testing import tiny_flux_pipeline
    from comm_measure import measure_attention_bytes

    def reset_xfuser():
        parallel_state.destroy_model_parallel()
        parallel_state._WORLD = None
        runtime_state._RUNTIME = None

    # refusals before any change: no CLEAR, a ControlNet pipeline, PipeFusion, a world that is not the SP degree
    errors = {}
    engine_config, _ = xFuserArgs(model="tiny", ulysses_degree=2).create_config()
    checks = [("no_clear", lambda: xdit.apply(tiny_flux_pipeline(0), engine_config))]
    controlnet = tiny_flux_pipeline(0, controlnet=True)
    clear_adapters.attach(controlnet, 4)
    checks.append(("controlnet", lambda: xdit.apply(controlnet, engine_config)))
    for name, call in checks:
        try:
            call()
            errors[name] = None
        except xdit.ParallelError as exc:
            errors[name] = str(exc)
    errors["unchanged"] = type(controlnet.transformer).__name__ == "FluxTransformer2DModel"
    results["xdit_errors"] = errors
    reset_xfuser()

    for mode in ("ulysses", "ring"):
        degrees = dict(ulysses_degree=2) if mode == "ulysses" else dict(ring_degree=2)
        # xfuser's own attention backend never runs (CLEAR covers every layer); for ring it must be one that
        # xfuser accepts for ring parallelism, which SDPA (its CPU default) is not
        backend = "SDPA_FLASH" if mode == "ring" else None
        engine_config, _ = xFuserArgs(model="tiny", attention_backend=backend, **degrees).create_config()
        cases = []
        # (tokens high, wide, text length, window, down): text split (16 % 2 == 0) and not split (15)
        for rows, cols, text_len, window, down in [(32, 24, 16, 4, 1), (13, 10, 15, 3, 1), (12, 8, 16, 3, 4)]:
            pipe = tiny_flux_pipeline(0)
            transformer = pipe.transformer
            if mode == "ring" and down > 1:  # refused before anything changes
                clear_adapters.attach(pipe, window, down_factor=down)
                try:
                    xdit.apply(pipe, engine_config)
                    results["ring_pooled"] = None
                except xdit.ParallelError as exc:
                    results["ring_pooled"] = str(exc)
                continue
            inputs = tiny_inputs(transformer, rows, cols, text_len=text_len)
            with torch.no_grad():
                full_attention = transformer(**inputs)[0]
            clear_adapters.attach(pipe, window, down_factor=down)
            with torch.no_grad():
                reference = transformer(**inputs)[0]
                handle = xdit.apply(pipe, engine_config)
                out = transformer(**inputs)[0]
                counted = handle.stats.bytes_per_layer
                measured = measure_attention_bytes(lambda: transformer(**inputs), ranks=2)
                handle.remove()
                after = transformer(**inputs)[0]
            cases.append(dict(grid=[rows, cols], text=text_len, window=window, down=down,
                              max_diff=max_diff(out, reference), after_remove=max_diff(after, reference),
                              window_effect=max_diff(reference, full_attention), counted=counted,
                              measured=measured["bytes_per_call"],
                              formula=xdit.bytes_per_layer(mode, height=rows, width=cols, text_len=text_len,
                                                           heads=2, head_dim=16, ranks=2, element_size=4)))
        # the whole pipeline at 128 x 96 px
        pipe = tiny_flux_pipeline(0)
        clear_adapters.attach(pipe, 4)
        kwargs = dict(prompt="a photo of a cat", height=128, width=96, num_inference_steps=2,
                      max_sequence_length=16, output_type="pt")
        with torch.no_grad():
            reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
            handle = xdit.apply(pipe, engine_config)
            image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        results[mode] = dict(cases=cases, pipeline=max_diff(image, reference))
        if mode == "ulysses":
            # an image whose tokens do not split evenly: a clear error instead of xfuser's missing method
            try:
                pipe(**dict(kwargs, height=132, width=100), generator=torch.Generator().manual_seed(0))
                results["indivisible"] = None
            except xdit.ParallelError as exc:
                results["indivisible"] = str(exc)
        handle.remove()
        if mode == "ulysses":
            # halo on xfuser's sequence-parallel group
            with torch.no_grad():
                handle = halo.apply(pipe)
                image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
                handle.remove()
            results["halo_on_xfuser_group"] = dict(max_diff=max_diff(image, reference),
                                                   group_is_xfuser=handle.strategy.group is not
                                                   torch.distributed.group.WORLD)
        reset_xfuser()



# ------------------------------------------------------------------------------------------------ main
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())


def write(results, rank):
    results["xfuser_imported"] = "xfuser" in sys.modules
    (OUT / f"rank{rank}.json").write_text(json.dumps(results))


class _NoXfuser:
    """Import finder that makes xfuser look uninstalled: halo mode must not need it."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in ("xfuser", "yunchang"):
            raise ImportError(f"{fullname} is blocked in this test: halo mode must work without xfuser")
        return None


def main():
    rank = int(os.environ["RANK"])
    results = {}
    blocker = _NoXfuser()
    sys.meta_path.insert(0, blocker)  # halo first, with xfuser unimportable
    import torch

    torch.set_num_threads(1)
    from clear_adapters.integrations._parallel import ParallelError, init_distributed

    start = time.time()
    try:
        init_distributed("gloo", timeout_s=TIMEOUT_S)
    except ParallelError as exc:
        results.update(init_error=str(exc), seconds=time.time() - start)
        write(results, rank)
        return
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_halo(results, rank, tmp)
            results["xfuser_during_halo"] = "xfuser" in sys.modules
            sys.meta_path.remove(blocker)
            run_xdit(results, rank, tmp)
            run_diffusers_cp(results)
            run_dead_rank(results, rank, tmp)  # last: it ends rank 1 and breaks the group
    except Exception:  # noqa: BLE001 - the test reads the traceback from the results
        results["error"] = traceback.format_exc()
    results["seconds"] = time.time() - start
    write(results, rank)


if __name__ == "__main__":
    main()
