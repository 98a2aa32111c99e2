"""The toy's compatibility cases: CLEAR with trained plugins on a trained model, scored by a detector.

On ``--pipeline toy`` (the miniature FLUX shipped in :mod:`clear_adapters.toy`) every case runs a batch
of prompts with full attention, with the distilled adapter and with the bare pattern at the same window
(zero-shot), and scores the images with :mod:`clear_adapters.toy.detector`:

* ``toy/base``           prompt following (right colour in the right one of 9 cells), no plugin;
* ``toy/lora``           the toy's LoRA (``load_lora_weights``), trigger word ``snowy``: light background;
* ``toy/controlnet``     the toy's ``FluxControlNetModel``: shapes where the Canny condition puts them (IoU);
* ``toy/variant``        the fine-tuned variant (knows ``cyan``), adapter in ``replace`` mode;
* ``toy/variant-delta``  the same in ``delta`` mode (``W_variant + W_clear - W_base``, base: the toy);

The plugin cases also compare CLEAR vs full attention with the plugin off on the same prompts (the
plugin-free PSNR) and the plugin's effect (task score on minus off) under CLEAR and full attention.
"""

from __future__ import annotations

import torch

from clear_adapters.compat import Case, CaseSetup, CaseSkipped

#: Prompts per case: enough for a detector rate, few enough for the matrix to stay under 3 minutes here.
PROMPTS = 8


def control_image(scene):
    """The toy ControlNet's condition: Canny edges of the scene's rendering (RGB PIL, white on black)."""
    from clear_adapters.imaging import to_pil
    from clear_adapters.toy.data import render

    from .controlnet import canny

    return canny(to_pil(render(scene)))


def _need_toy(ctx) -> None:
    if not ctx.toy:
        raise CaseSkipped("runs on --pipeline toy only (trained plugins and a detector)")


def _batch(images: torch.Tensor) -> torch.Tensor:
    return images if images.ndim == 4 else images[None]


def _rate(score, scenes):
    """A task: the mean of ``score(image, scene)`` over the batch."""
    def task(images):
        images = _batch(images)
        return sum(float(score(im, s)) for im, s in zip(images, scenes)) / len(scenes)
    return task


def _prompts(scenes) -> dict:
    return {"prompt": [s.caption for s in scenes]}


def _prepare_base(ctx) -> CaseSetup:
    from clear_adapters.toy import data, detector

    _need_toy(ctx)
    scenes = data.single_object_prompts(PROMPTS, seed=ctx.seed)
    return CaseSetup(ctx.base_pipeline(), _prompts(scenes), task=_rate(detector.placed_right, scenes),
                     task_name="placement", thresholds={"min_psnr": 17.0, "min_gain_over_zero_shot_db": 5.0},
                     notes=f"{PROMPTS} single-object prompts; task: right colour in the right 3x3 cell")


def _prepare_lora(ctx) -> CaseSetup:
    from clear_adapters.toy import data, detector
    from clear_adapters.toy.pipeline import lora_path

    _need_toy(ctx)
    pipe = ctx.base_pipeline()
    pipe.load_lora_weights(str(lora_path()), adapter_name="toy_snowy")
    scenes = [data.with_trigger(s) for s in data.single_object_prompts(PROMPTS, seed=ctx.seed + 1)]

    def off(generate):
        pipe.disable_lora()
        try:
            return generate()
        finally:
            pipe.enable_lora()

    return CaseSetup(pipe, _prompts(scenes), off=off, off_description="disable_lora()",
                     task=_rate(lambda im, s: detector.light_background(im), scenes), task_name="snowy",
                     teardown=pipe.unload_lora_weights,
                     notes="LoRA (rank 8, attention projections) loaded before CLEAR; prompts start with 'snowy'")


def _prepare_controlnet(ctx) -> CaseSetup:
    from clear_adapters.toy import data, detector
    from clear_adapters.toy.pipeline import toy_controlnet_pipeline

    _need_toy(ctx)
    pipe = toy_controlnet_pipeline(base=ctx.base_pipeline())
    scenes = data.single_object_prompts(PROMPTS, seed=ctx.seed + 2)
    call = {"prompt": [data.without_positions(s).caption for s in scenes],
            "control_image": [control_image(s) for s in scenes], "controlnet_conditioning_scale": 1.0}
    return CaseSetup(pipe, call, off=lambda generate: generate(controlnet_conditioning_scale=0.0),
                     off_description="controlnet_conditioning_scale=0", task=_rate(detector.mask_iou, scenes),
                     task_name="IoU",
                     notes="prompts without positions; the Canny condition places the shape; task: mask IoU")


def _prepare_variant(ctx, mode: str) -> CaseSetup:
    from clear_adapters.toy import data, detector
    from clear_adapters.toy.pipeline import weights_path

    _need_toy(ctx)
    base = ctx.base_pipeline()
    pipe = ctx.load_pipeline(str(weights_path("variant")))  # shares the base's text encoders and VAE
    half = PROMPTS // 2
    scenes = data.colour_scenes(data.VARIANT_COLOUR, half, seed=ctx.seed) + \
        data.single_object_prompts(PROMPTS - half, seed=ctx.seed + 3)
    load_kwargs = {"weight_mode": mode}
    compare = {}
    thresholds = {"min_gain_over_zero_shot_db": 4.0}
    if mode == "replace":
        thresholds.update(max_task_drop=None, min_effect_ratio=None)
    if mode == "delta":
        load_kwargs["base"] = "toy"
        compare = {"toy/variant": "max_delta_deficit_vs_replace_db"}
    return CaseSetup(pipe, _prompts(scenes), off=lambda generate: generate(pipe=base), off_with_clear=False,
                     off_description="the base toy (not fine-tuned) on the same prompts", load_kwargs=load_kwargs,
                     task=_rate(detector.placed_right, scenes), task_name="placement",
                     thresholds=thresholds, compare_with=compare,
                     notes=f"fine-tune that learned '{data.VARIANT_COLOUR}'; half the prompts use it; " + (
                         "W_variant + (W_clear - W_base)" if mode == "delta" else
                         "the adapter's weights replace the variant's projections, so what the fine-tune changed "
                         "there is lost: its task score is reported, not checked (delta mode keeps it)"))


CASES = [
    Case("toy/base", "none", "the trained toy, no plugin: prompt following", _prepare_base),
    Case("toy/lora", "lora", "the toy's LoRA via load_lora_weights, trigger word 'snowy'", _prepare_lora),
    Case("toy/controlnet", "controlnet", "the toy's FluxControlNetModel, Canny condition", _prepare_controlnet),
    Case("toy/variant", "finetuned", "the toy's fine-tuned variant, weight_mode='replace'",
         lambda ctx: _prepare_variant(ctx, "replace")),
    Case("toy/variant-delta", "finetuned", "the toy's fine-tuned variant, weight_mode='delta'",
         lambda ctx: _prepare_variant(ctx, "delta")),
]
