"""CLEAR on FLUX variants: schnell-like, Kontext, Fill, Img2Img and fine-tuned transformers.

* schnell-like (no guidance embedding) and Img2Img need nothing: the attention layers are the same.
* Kontext appends the reference image's tokens after the target's (frame id 1, same row/column
  coordinates). CLEAR measures the window on (row, column) whatever the frame, so a target token sees
  the reference around the same place and the cost stays linear.
* Fill concatenates the masked image and mask on channels; the sequence is unchanged.
* Fine-tuned variants (e.g. FLUX.1-Krea-dev) have attention weights that differ from the adapter's
  base. Two ways to install an adapter trained on the base: ``weight_mode="replace"`` writes the
  adapter's projections (what the paper did for zero-shot transfer) and ``weight_mode="delta"``
  writes ``W_variant + (W_clear - W_base)``, keeping the variant's own change; only the base tensors
  the adapter touches are read (``base=`` a state dict, a local diffusers directory or a Hub id).

Real pipelines need ``--schnell ID``, ``--kontext ID``, ``--fill ID`` and ``--variant ID`` (diffusers
FLUX pipelines; they share the base pipeline's text encoders and VAE); Img2Img reuses ``--pipeline``.
The delta case reads the base tensors from ``--base`` (default: the adapter's ``base_model``, fetched
with HTTP range requests: only the attention projections, not the 24 GB transformer).
"""

from __future__ import annotations

from clear_adapters.compat import Case, CaseSetup, drop


def delta_weights(variant: dict, clear: dict, base: dict) -> dict:
    """What ``weight_mode="delta"`` writes: ``W_variant + (W_clear - W_base)`` per key (float32)."""
    return {k: variant[k].float() + (clear[k].float() - base[k].float()) for k in clear}


def _mask(size, full: bool = False):
    from PIL import Image

    width, height = size
    mask = Image.new("L", (width, height), 255 if full else 0)
    if not full:
        mask.paste(255, (width // 2, 0, width, height))  # repaint the right half
    return mask


def _separate(ctx, key: str, hint: str, pipeline_class=None, tiny_factory=None):
    """The variant's pipeline: tiny builds one, real loads ``--key`` once (released in teardown)."""
    if ctx.tiny:
        return tiny_factory(), None
    source = ctx.resource(key, hint)[0]
    ctx.base_pipeline()  # loaded first, so the variant shares its text encoders and VAE
    pipe = ctx.load_pipeline(source, pipeline_class)
    return pipe, (lambda: ctx.release(pipe))


# ------------------------------------------------------------------------------------------------ cases
def _prepare_schnell(ctx) -> CaseSetup:
    from clear_adapters.testing import tiny_flux_pipeline

    pipe, teardown = _separate(ctx, "schnell", "ID (a FLUX.1-schnell pipeline, e.g. black-forest-labs/FLUX.1-schnell)",
                               tiny_factory=lambda: tiny_flux_pipeline(0, guidance_embeds=False))
    base = ctx.base_pipeline()
    call = {"guidance_scale": 0.0}
    if not ctx.tiny:
        call["max_sequence_length"] = 256  # schnell's T5 limit
    return CaseSetup(pipe, call, off=lambda generate: generate(pipe=base), off_with_clear=False,
                     off_description="the base (guidance-distilled, dev-like) model on the same call",
                     teardown=teardown, notes="no guidance embedding (timestep-distilled)")


def _prepare_kontext(ctx) -> CaseSetup:
    from diffusers import FluxKontextPipeline

    from clear_adapters.testing import tiny_flux_pipeline

    pipe, teardown = _separate(ctx, "kontext", "ID (e.g. black-forest-labs/FLUX.1-Kontext-dev)", FluxKontextPipeline,
                               lambda: tiny_flux_pipeline(0, pipeline_class=FluxKontextPipeline))
    call = {"image": ctx.condition_image(), "max_area": ctx.width * ctx.height, "_auto_resize": False}
    return CaseSetup(pipe, call, off=lambda generate: generate(image=drop()),
                     off_description="no reference image (text-to-image)", teardown=teardown,
                     notes="reference-image tokens (frame 1) appended after the target's; window on (row, col)")


def _prepare_fill(ctx) -> CaseSetup:
    from diffusers import FluxFillPipeline

    from clear_adapters.testing import tiny_flux_fill_pipeline

    pipe, teardown = _separate(ctx, "fill", "ID (e.g. black-forest-labs/FLUX.1-Fill-dev)", FluxFillPipeline,
                               lambda: tiny_flux_fill_pipeline(0))
    size = (ctx.width, ctx.height)
    call = {"image": ctx.condition_image(), "mask_image": _mask(size)}
    return CaseSetup(pipe, call, off=lambda generate: generate(mask_image=_mask(size, full=True)),
                     off_description="mask covering the whole image (nothing kept)", teardown=teardown,
                     notes="masked image + mask concatenated on channels (transformer in_channels differ)")


def _prepare_img2img(ctx) -> CaseSetup:
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    from clear_adapters.testing import tiny_flux_pipeline

    if ctx.tiny:
        pipe = tiny_flux_pipeline(0, pipeline_class=FluxImg2ImgPipeline)
    else:
        pipe = FluxImg2ImgPipeline.from_pipe(ctx.base_pipeline())
        pipe.set_progress_bar_config(disable=True)
    grey = Image.new("RGB", (ctx.width, ctx.height), (128, 128, 128))
    return CaseSetup(pipe, {"image": ctx.condition_image(), "strength": 0.5},
                     off=lambda generate: generate(image=grey), off_description="a flat grey init image",
                     notes="SDEdit-style image-to-image, strength 0.5")


def _finetuned(ctx):
    """(variant pipeline, base pipeline, teardown) for the fine-tuned cases."""
    from clear_adapters.testing import tiny_finetuned_transformer, tiny_flux_pipeline

    if ctx.tiny:
        pipe = tiny_flux_pipeline(0)
        pipe.register_modules(transformer=tiny_finetuned_transformer(pipe.transformer, seed=7, scale=0.05))
        return pipe, ctx.base_pipeline(), None
    source = ctx.resource("variant", "ID (a fine-tuned FLUX.1-dev, e.g. black-forest-labs/FLUX.1-Krea-dev)")[0]
    base = ctx.base_pipeline()
    pipe = ctx.load_pipeline(source)
    return pipe, base, (lambda: ctx.release(pipe))


def _prepare_finetuned(ctx, mode: str) -> CaseSetup:
    pipe, base, teardown = _finetuned(ctx)
    load_kwargs = {"weight_mode": mode}
    extra_checks = None
    if mode == "delta":
        if ctx.tiny:
            directory = ctx.workdir / "tiny_base_transformer"
            if not (directory / "config.json").is_file():
                base.transformer.save_pretrained(directory)  # a local diffusers model directory as the base
            load_kwargs["base"] = str(directory)
        elif ctx.resources.get("base"):
            load_kwargs["base"] = ctx.resources["base"][0]
        extra_checks = _delta_formula_check(pipe, load_kwargs.get("base"), sample=None if ctx.tiny else 8)
    if mode == "delta":
        from clear_adapters.reports import shown_source  # a local base is named, its folder is not shown

        base_name = shown_source(load_kwargs["base"]) if load_kwargs.get("base") else "the adapter's base_model"
        notes = f"W_variant + (W_clear - W_base), base read from {base_name}"
    else:
        notes = "the adapter's weights replace the variant's"
    return CaseSetup(pipe, {}, off=lambda generate: generate(pipe=base), off_with_clear=False,
                     off_description="the base model (not fine-tuned) on the same call", load_kwargs=load_kwargs,
                     extra_checks=extra_checks, teardown=teardown, notes=notes)


def _delta_formula_check(pipe, base_source, sample: int | None):
    """After the run: the weights ``delta`` wrote equal ``W_variant + (W_clear - W_base)``."""
    def checks(runner):
        from safetensors import safe_open

        from clear_adapters import api
        from clear_adapters.base_weights import load_base_tensors
        from clear_adapters.weights import normalize_keys

        spec = api.resolve(runner.adapter)
        with safe_open(str(spec.weights_path), framework="pt") as fh:
            keys = [k for k in fh.keys() if not k.endswith("spatial_weight")]
            keys = keys[:sample] if sample else keys
            clear = normalize_keys({k: fh.get_tensor(k) for k in keys})

        def current(key):
            layer, name = key.rsplit(".", 1)
            module = pipe.transformer.get_submodule(layer)
            return getattr(getattr(module, "base_layer", module), name).detach().float().cpu().clone()

        variant = {k: current(k) for k in clear}
        base = load_base_tensors(base_source if base_source is not None else spec.base_model, list(clear))
        expected = delta_weights(variant, clear, base)
        runner.load_clear()
        try:
            written = {k: current(k) for k in clear}
        finally:
            api.unload(pipe)
        worst = max(float((written[k] - expected[k]).abs().max()) for k in clear)
        return {"delta_formula": worst <= 1e-5, "delta_formula_max_error": worst}

    return checks


CASES = [
    Case("variant/schnell", "schnell", "schnell-like transformer without guidance embedding", _prepare_schnell),
    Case("variant/kontext", "kontext", "FluxKontextPipeline: reference-image tokens after the target tokens",
         _prepare_kontext),
    Case("variant/fill", "fill", "FluxFillPipeline: masked image and mask concatenated on channels", _prepare_fill),
    Case("variant/img2img", "img2img", "FluxImg2ImgPipeline (SDEdit)", _prepare_img2img),
    Case("variant/finetuned", "finetuned", "fine-tuned transformer, weight_mode='replace' (what the paper did)",
         lambda ctx: _prepare_finetuned(ctx, "replace")),
    Case("variant/finetuned-delta", "finetuned", "fine-tuned transformer, weight_mode='delta' "
         "(W_variant + W_clear - W_base)", lambda ctx: _prepare_finetuned(ctx, "delta")),
]

