"""CLEAR with FLUX IP-Adapters (``pipe.load_ip_adapter``).

diffusers swaps attention processors when an IP-Adapter is loaded or unloaded (and re-creates the
single-block ones with a no-argument constructor). CLEAR keeps its state on the attention modules and
converts a stock processor back into its CLEAR twin just before it runs, so loading and unloading in
any order keeps CLEAR active. The IP branch (image queries against the projected image-prompt tokens)
is left exactly as diffusers computes it: dense, no RoPE, no window — it is 4 keys per query.

Real pipelines need ``--ip-adapter SOURCE`` (Hub repo id, directory or ``owner/repo/file.safetensors``;
e.g. ``XLabs-AI/flux-ip-adapter/ip_adapter.safetensors``) and ``--image-encoder ID`` (e.g.
``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

from clear_adapters.compat import Case, CaseSetup, max_difference

IP_HINT = ("SOURCE (a FLUX IP-Adapter: owner/repo/file.safetensors, "
           "e.g. XLabs-AI/flux-ip-adapter/ip_adapter.safetensors)")
ENCODER_HINT = "ID (the IP-Adapter's CLIP image encoder, e.g. openai/clip-vit-large-patch14)"
TINY_WEIGHT_NAME = "ip_adapter.safetensors"


def _check_resources(ctx) -> None:
    if not ctx.tiny:  # before any model is loaded: a missing option skips the case cheaply
        ctx.resource("ip_adapter", IP_HINT)
        ctx.resource("image_encoder", ENCODER_HINT)


def install_ip_adapter(pipe, ctx, scale: float = 1.0) -> None:
    """Load the case's IP-Adapter into ``pipe`` (tiny: an offline encoder and weights written to the workdir)."""
    if ctx.tiny:
        from clear_adapters.testing import tiny_image_encoder, write_tiny_ip_adapter

        path = ctx.workdir / "tiny_ip_adapter" / TINY_WEIGHT_NAME
        if not path.is_file():
            write_tiny_ip_adapter(path, pipe.transformer)
        encoder, processor = tiny_image_encoder()
        # Registered before loading so diffusers does not look for an encoder on the Hub.
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.load_ip_adapter(str(path.parent), weight_name=TINY_WEIGHT_NAME)
    else:
        from .lora import split_lora_source

        source, weight_name = split_lora_source(ctx.resource("ip_adapter", IP_HINT)[0])
        encoder = ctx.resource("image_encoder", ENCODER_HINT)[0]
        pipe.load_ip_adapter(source, weight_name=weight_name or TINY_WEIGHT_NAME,
                             image_encoder_pretrained_model_name_or_path=encoder, image_encoder_dtype=ctx.dtype)
    pipe.set_ip_adapter_scale(scale)


def _call(ctx) -> dict:
    from PIL import ImageOps

    return {"ip_adapter_image": ImageOps.mirror(ctx.condition_image())}


def _scale_zero(pipe, scale: float):
    def off(generate):
        pipe.set_ip_adapter_scale(0.0)
        try:
            return generate()
        finally:
            pipe.set_ip_adapter_scale(scale)

    return off


def _unload_ip_keeps_clear(pipe):
    """With CLEAR loaded, ``unload_ip_adapter`` keeps CLEAR and equals the scale-0 run (no IP at all)."""
    def checks(runner):
        image, active = runner.generate_after_removing_plugin(pipe.unload_ip_adapter, ip_adapter_image=None)
        full = runner.generate(ip_adapter_image=None)
        return {"unload_ip_keeps_clear": active,
                "scale0_equals_no_ip_with_clear": max_difference(image, runner.images["off_clear"]) <= 1e-5,
                "scale0_equals_no_ip": max_difference(full, runner.images["off"]) <= 1e-5}

    return checks


def _teardown(ctx, pipe):
    def teardown():
        if getattr(pipe.transformer, "encoder_hid_proj", None) is not None:
            pipe.unload_ip_adapter()
    return teardown


def _prepare_ip_then_clear(ctx, scale: float = 1.0) -> CaseSetup:
    _check_resources(ctx)
    pipe = ctx.base_pipeline()
    install_ip_adapter(pipe, ctx, scale)
    return CaseSetup(pipe, _call(ctx), off=_scale_zero(pipe, scale), off_description="set_ip_adapter_scale(0)",
                     extra_checks=_unload_ip_keeps_clear(pipe), teardown=_teardown(ctx, pipe),
                     notes="IP-Adapter loaded first, then CLEAR; then unload_ip_adapter with CLEAR installed")


def _prepare_clear_then_ip(ctx, scale: float = 1.0) -> CaseSetup:
    from clear_adapters import api

    _check_resources(ctx)
    pipe = ctx.base_pipeline()
    install_ip_adapter(pipe, ctx, scale)

    def install_clear(pipe, install):
        pipe.unload_ip_adapter()
        handle = install()
        install_ip_adapter(pipe, ctx, scale)
        return handle

    def checks(runner):
        runner.setup.install_clear = None
        try:
            handle = runner.load_clear()
            other_order = runner.generate()
            active = handle.kernel_calls > 0
        finally:
            api.unload(pipe)
            runner.setup.install_clear = install_clear
        return {"order_independent": active and max_difference(other_order, runner.images["clear"]) <= 1e-5}

    return CaseSetup(pipe, _call(ctx), off=_scale_zero(pipe, scale), off_description="set_ip_adapter_scale(0)",
                     install_clear=install_clear, extra_checks=checks, teardown=_teardown(ctx, pipe),
                     notes="CLEAR loaded first, then the IP-Adapter; compared with the other order")


CASES = [
    Case("ip_adapter/ip-then-clear", "ip_adapter", "load_ip_adapter, then CLEAR; IP branch dense and intact",
         _prepare_ip_then_clear),
    Case("ip_adapter/clear-then-ip", "ip_adapter", "CLEAR first, then load_ip_adapter (same result)",
         _prepare_clear_then_ip),
]
