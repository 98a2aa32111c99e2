"""CLEAR with peft LoRAs loaded through diffusers (``load_lora_weights``).

No glue is needed: peft wraps the projections CLEAR's processors call, and CLEAR writes its weights
into the wrapped layer (``base_layer``) whichever was installed first, so CLEAR->LoRA and LoRA->CLEAR
give the same model. A fused LoRA is kept when CLEAR is loaded after it (its merged delta is added to
the adapter's weights) and when CLEAR is unloaded after it was fused. ``unload_lora_weights`` leaves
CLEAR installed; ``clear_adapters.unload`` leaves the LoRA installed.

Real pipelines need ``--lora SOURCE`` (a directory, a ``.safetensors`` file, a Hub repo id or
``owner/repo/file.safetensors``); give it twice for the two-adapter case (one is used twice otherwise).
"""

from __future__ import annotations

from pathlib import Path

from clear_adapters.compat import Case, CaseSetup, max_difference

ADAPTER_NAMES = ("lora_a", "lora_b")
LORA_HINT = "PATH (a FLUX LoRA: local directory or .safetensors file, Hub repo id, or owner/repo/file.safetensors)"


def split_lora_source(source: str) -> tuple[str, str | None]:
    """(what ``load_lora_weights`` takes, ``weight_name``) for a directory, a file or ``owner/repo/file``."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if path.exists():
        return str(path), None
    parts = source.split("/")
    if len(parts) > 2 and parts[-1].endswith(".safetensors"):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return source, None


def _lora_sources(ctx, count: int) -> list[tuple[str, str | None]]:
    if ctx.tiny:
        from clear_adapters.testing import tiny_flux_transformer, write_tiny_lora

        sources = []
        for i in range(count):
            directory = ctx.workdir / f"tiny_lora_{i}"
            if not (directory / "pytorch_lora_weights.safetensors").is_file():
                write_tiny_lora(directory, tiny_flux_transformer(0), rank=4, seed=100 + i, scale=1.0)
            sources.append((str(directory), None))
        return sources
    return [split_lora_source(s) for s in ctx.resource("lora", LORA_HINT, count)]


def load_loras(pipe, sources, weights=None) -> list[str]:
    """Load LoRAs as adapters ``lora_a``, ``lora_b``, ... and activate them all (``weights`` per adapter)."""
    names = list(ADAPTER_NAMES[:len(sources)])
    for name, (source, weight_name) in zip(names, sources):
        kwargs = {"weight_name": weight_name} if weight_name else {}
        pipe.load_lora_weights(source, adapter_name=name, **kwargs)
    if len(names) > 1 or weights is not None:
        pipe.set_adapters(names, weights or [1.0] * len(names))
    return names


def _disabled(generate, pipe):
    pipe.disable_lora()
    try:
        return generate()
    finally:
        pipe.enable_lora()


def _teardown(ctx, pipe):
    def teardown():
        if not ctx.tiny:  # the shared real pipeline goes back to its plain state
            if getattr(pipe, "num_fused_loras", 0):
                pipe.unfuse_lora()
            pipe.unload_lora_weights()
    return teardown


def _unload_lora_keeps_clear(pipe):
    """After the standard run: with CLEAR loaded, ``unload_lora_weights`` gives CLEAR without the LoRA."""
    def checks(runner):
        image, active = runner.generate_after_removing_plugin(pipe.unload_lora_weights)
        return {"unload_lora_keeps_clear": active and max_difference(image, runner.images["off_clear"]) <= 1e-5}
    return checks


def _prepare_lora_then_clear(ctx) -> CaseSetup:
    sources = _lora_sources(ctx, 1)  # resources first: a missing --lora skips before any model is loaded
    pipe = ctx.base_pipeline()
    load_loras(pipe, sources)
    return CaseSetup(pipe, {}, off=lambda generate: _disabled(generate, pipe), off_description="disable_lora()",
                     extra_checks=_unload_lora_keeps_clear(pipe), teardown=_teardown(ctx, pipe),
                     notes="LoRA loaded first, then CLEAR")


def _prepare_clear_then_lora(ctx) -> CaseSetup:
    from clear_adapters import api

    sources = _lora_sources(ctx, 1)
    pipe = ctx.base_pipeline()
    load_loras(pipe, sources)

    def install_clear(pipe, install):
        pipe.unload_lora_weights()
        handle = install()
        load_loras(pipe, sources)
        return handle

    def checks(runner):
        # The other order on the same pipeline must give the same image.
        runner.setup.install_clear = None
        try:
            runner.load_clear()
            other_order = runner.generate()
        finally:
            api.unload(pipe)
            runner.setup.install_clear = install_clear
        return {"order_independent": max_difference(other_order, runner.images["clear"]) <= 1e-5,
                "order_max_difference": max_difference(other_order, runner.images["clear"])}

    return CaseSetup(pipe, {}, off=lambda generate: _disabled(generate, pipe), off_description="disable_lora()",
                     install_clear=install_clear, extra_checks=checks, teardown=_teardown(ctx, pipe),
                     notes="CLEAR loaded first, then the LoRA; compared with the other order")


def _prepare_fused(ctx) -> CaseSetup:
    from clear_adapters import api

    sources = _lora_sources(ctx, 1)
    pipe = ctx.base_pipeline()
    load_loras(pipe, sources)
    pipe.fuse_lora()

    def off(generate):
        # Unfusing alone changes nothing visible (the adapter is then applied unmerged): disable it too.
        pipe.unfuse_lora()
        pipe.disable_lora()
        try:
            return generate()
        finally:
            pipe.enable_lora()
            pipe.fuse_lora()

    def checks(runner):
        handle = runner.load_clear()
        try:
            fused = runner.generate()
            pipe.unfuse_lora()
            unfused = runner.generate()
            pipe.fuse_lora()
            refused = runner.generate()
            active = handle.kernel_calls > 0
        finally:
            api.unload(pipe)
        return {"fuse_unfuse_round_trip": active and max_difference(fused, refused) <= 1e-5,
                "fused_equals_unfused": max_difference(fused, unfused) <= 1e-4,
                "fused_vs_unfused_max_difference": max_difference(fused, unfused)}

    return CaseSetup(pipe, {}, off=off, off_description="unfuse_lora() + disable_lora()", extra_checks=checks,
                     teardown=_teardown(ctx, pipe), notes="LoRA fused into the weights before CLEAR is loaded")


def _prepare_two(ctx) -> CaseSetup:
    from clear_adapters import api

    sources = _lora_sources(ctx, 2)
    pipe = ctx.base_pipeline()
    names = load_loras(pipe, sources, weights=[1.0, 0.7])

    def checks(runner):
        runner.load_clear()
        try:
            pipe.set_adapters(names[:1])
            only_first = runner.generate()
        finally:
            pipe.set_adapters(names, [1.0, 0.7])
            api.unload(pipe)
        return {"set_adapters_under_clear": max_difference(only_first, runner.images["clear"]) > 1e-4}

    return CaseSetup(pipe, {}, off=lambda generate: _disabled(generate, pipe), off_description="disable_lora()",
                     extra_checks=checks, teardown=_teardown(ctx, pipe),
                     notes="two adapters, set_adapters([a, b], [1.0, 0.7])")


CASES = [
    Case("lora/lora-then-clear", "lora", "peft LoRA via load_lora_weights, then CLEAR", _prepare_lora_then_clear),
    Case("lora/clear-then-lora", "lora", "CLEAR first, then the LoRA (same result as the other order)",
         _prepare_clear_then_lora),
    Case("lora/fused", "lora", "fuse_lora() before CLEAR; unfuse/fuse with CLEAR installed", _prepare_fused),
    Case("lora/two-adapters", "lora", "two LoRAs combined with set_adapters", _prepare_two),
]
