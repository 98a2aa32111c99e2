"""CLEAR with FLUX ControlNets: single, multi and union (ControlNet-Union) models.

Nothing extra is needed to run them: ``clear_adapters.load(..., controlnet=True)`` (the default)
installs CLEAR in every ControlNet's attention layers too, with the adapter's change relative to
the transformer (``W_controlnet + (W_clear - W_transformer)``); ``controlnet=False`` keeps them dense.
A union ControlNet prepends one mode token to its text, so its text length differs from the
transformer's in the same call; CLEAR's geometry is derived per call and handles that.

Glue here: :func:`canny` (control images), :func:`union_controlnet` (diffusers' ``from_config`` drops
``num_mode``, so union models are constructed directly) and the matrix cases.
"""

from __future__ import annotations

import logging

import torch

from clear_adapters.compat import Case, CaseSetup

logger = logging.getLogger("clear_adapters")

#: ControlNet-Union mode of Canny edges in the published InstantX/Shakker union models.
CANNY_MODE = 0


# ------------------------------------------------------------------------------------------------ Canny
def canny(image, low_threshold: int = 100, high_threshold: int = 200):
    """Canny edge map of a PIL image as an RGB PIL image (white edges on black), like ControlNet's inputs.

    Uses OpenCV (``opencv-python-headless``) when it is installed, otherwise an equivalent torch
    implementation (3x3 Sobel, L1 magnitude, non-maximum suppression, hysteresis), so control images
    can be made without optional dependencies. ``controlnet_aux.CannyDetector`` wraps the same
    OpenCV call, but importing ``controlnet_aux`` pulls in torchvision and timm.
    """
    import numpy as np
    from PIL import Image

    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    try:
        import cv2
    except ImportError:
        edges = canny_torch(torch.from_numpy(gray.astype(np.float32)), low_threshold, high_threshold)
        edges = (edges.numpy().astype(np.uint8) * 255)
    else:
        edges = cv2.Canny(gray, low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def canny_torch(gray: torch.Tensor, low_threshold: float = 100, high_threshold: float = 200) -> torch.Tensor:
    """Boolean (H, W) edge map of a (H, W) grey image in [0, 255] (OpenCV's default Canny settings)."""
    import torch.nn.functional as F

    x = gray.float()[None, None]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(padded, sobel_x[None, None])[0, 0]
    gy = F.conv2d(padded, sobel_x.t()[None, None])[0, 0]
    magnitude = gx.abs() + gy.abs()
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees.
    m = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]
    h, w = magnitude.shape

    def shifted(dy, dx):
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = gx.abs(), gy.abs()
    tan_22 = 0.4142135623730951
    horizontal = ay <= ax * tan_22
    vertical = ay * tan_22 > ax
    same_sign = (gx * gy) > 0
    keep = torch.where(horizontal, (magnitude > shifted(0, -1)) & (magnitude >= shifted(0, 1)),
                       torch.where(vertical, (magnitude > shifted(-1, 0)) & (magnitude >= shifted(1, 0)),
                                   torch.where(same_sign,
                                               (magnitude > shifted(-1, -1)) & (magnitude >= shifted(1, 1)),
                                               (magnitude > shifted(-1, 1)) & (magnitude >= shifted(1, -1)))))
    candidates = keep & (magnitude > low_threshold)
    edges = keep & (magnitude > high_threshold)
    # Hysteresis: grow strong edges through connected (8-neighbour) weak ones until nothing changes.
    while True:
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & candidates
        if torch.equal(grown, edges):
            return edges
        edges = grown


# ------------------------------------------------------------------------------------------------ models
def union_controlnet(transformer, num_mode: int, num_layers: int = 2, num_single_layers: int = 0,
                     load_weights_from_transformer: bool = True):
    """A ``FluxControlNetModel`` in union mode (``num_mode`` control types) shaped like ``transformer``.

    ``FluxControlNetModel.from_transformer``/``from_config`` drop ``num_mode``, so this constructs the
    model directly and copies the embedders and blocks from the transformer as ``from_transformer`` does.
    """
    from diffusers import FluxControlNetModel

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    keys = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    net = FluxControlNetModel(**{k: config[k] for k in keys if k in config}, num_layers=num_layers,
                              num_single_layers=num_single_layers, num_mode=num_mode)
    if load_weights_from_transformer:
        for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"):
            getattr(net, name).load_state_dict(getattr(transformer, name).state_dict())
        net.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
        net.single_transformer_blocks.load_state_dict(transformer.single_transformer_blocks.state_dict(), strict=False)
    if net.dtype != transformer.dtype or net.device != transformer.device:
        net = net.to(dtype=transformer.dtype, device=transformer.device)
    return net.eval()


def _control_image(ctx, flip: bool = False):
    from PIL import ImageOps

    image = ctx.condition_image()
    return canny(ImageOps.mirror(image) if flip else image)


def _controlnet_pipeline(ctx, nets):
    """A FluxControlNetPipeline around ``nets`` (one model or a list for FluxMultiControlNetModel)."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    net = FluxMultiControlNetModel(nets) if isinstance(nets, list) else nets
    base = ctx.base_pipeline()
    components = {k: v for k, v in base.components.items() if k != "controlnet"}
    pipe = FluxControlNetPipeline(**components, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _nets(ctx, count: int, union: bool = False):
    if ctx.tiny:
        from diffusers import FluxControlNetModel

        from clear_adapters.testing import randomize_controlnet_outputs, tiny_flux_transformer

        transformer = tiny_flux_transformer(0)
        nets = []
        for i in range(count):
            torch.manual_seed(10 + i)
            if union:
                net = union_controlnet(transformer, num_mode=3, num_layers=1, num_single_layers=1)
            else:
                net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                           attention_head_dim=16, num_attention_heads=2)
            nets.append(randomize_controlnet_outputs(net, seed=10 + i).eval())
        return nets
    from diffusers import FluxControlNetModel

    key = "controlnet_union" if union else "controlnet"
    hint = "ID (a FLUX ControlNet-Union, e.g. InstantX/FLUX.1-dev-Controlnet-Union)" if union else \
        "ID (a FLUX ControlNet for Canny edges, e.g. InstantX/FLUX.1-dev-Controlnet-Canny)"
    sources = ctx.resource(key, hint, count)
    cache = ctx._loaded
    nets = []
    for i, source in enumerate(sources):
        # One instance per slot, even for the same source: clear_adapters.load lists a model held twice
        # by a FluxMultiControlNetModel twice and refuses the second install.
        key = ("controlnet", source, i)
        if key not in cache:
            cache[key] = FluxControlNetModel.from_pretrained(source, torch_dtype=ctx.dtype).to(ctx.device).eval()
        nets.append(cache[key])
    return nets


def _scale_off(scale_key="controlnet_conditioning_scale", value=0.0):
    def off(generate):
        return generate(**{scale_key: value})

    return off


# ------------------------------------------------------------------------------------------------ cases
def _prepare_single(ctx, dense: bool = False) -> CaseSetup:
    from clear_adapters import api, processors
    from clear_adapters.weights import attention_layers

    pipe = _controlnet_pipeline(ctx, _nets(ctx, 1)[0])
    call = {"control_image": _control_image(ctx), "controlnet_conditioning_scale": 0.7}

    def checks(runner):
        handle = runner.load_clear()
        try:
            net_layers = [attn for _, attn in attention_layers(pipe.controlnet)]
            clear_inside = runner.generate()
            processor_kinds = {processors.is_clear(a.processor) for a in net_layers}
            targets = list(handle.targets)
        finally:
            api.unload(pipe)
        result = {"controlnet_is_target": ("controlnet" in targets) != dense,
                  "controlnet_processors_clear": processor_kinds == {not dense}}
        if not dense:
            # CLEAR inside the ControlNet must matter: the same adapter with a dense ControlNet differs.
            runner.setup.load_kwargs = {"controlnet": False}
            runner.load_clear()
            try:
                dense_net = runner.generate()
            finally:
                api.unload(pipe)
                runner.setup.load_kwargs = {}
            result["clear_in_controlnet_changes_output"] = float((dense_net - clear_inside).abs().max()) > 1e-4
        return result

    return CaseSetup(pipe, call, off=_scale_off(), off_description="controlnet_conditioning_scale=0",
                     load_kwargs={"controlnet": False} if dense else {}, extra_checks=checks,
                     notes="ControlNet attention dense (controlnet=False)" if dense else
                     "CLEAR in the transformer and in the ControlNet blocks")


def _prepare_multi(ctx) -> CaseSetup:
    pipe = _controlnet_pipeline(ctx, _nets(ctx, 2))
    call = {"control_image": [_control_image(ctx), _control_image(ctx, flip=True)],
            "controlnet_conditioning_scale": [0.6, 0.4], "control_mode": None}
    return CaseSetup(pipe, call, off=_scale_off(value=[0.0, 0.0]), off_description="both conditioning scales 0",
                     notes="FluxMultiControlNetModel with two ControlNets (Canny, mirrored Canny)")


def _prepare_union(ctx) -> CaseSetup:
    from clear_adapters import api

    net = _nets(ctx, 1, union=True)[0]
    pipe = _controlnet_pipeline(ctx, net)
    call = {"control_image": _control_image(ctx), "control_mode": CANNY_MODE, "controlnet_conditioning_scale": 0.7}

    def checks(runner):
        # The mode token makes the ControlNet's text one token longer than the transformer's.
        seen = {}

        def probe(name):
            def hook(module, args, kwargs):
                seen[name] = kwargs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in kwargs else None
            return hook

        handles = [pipe.transformer.transformer_blocks[0].register_forward_pre_hook(probe("transformer"),
                                                                                   with_kwargs=True),
                   net.transformer_blocks[0].register_forward_pre_hook(probe("controlnet"), with_kwargs=True)]
        runner.load_clear()
        try:
            runner.generate()
        finally:
            api.unload(pipe)
            for h in handles:
                h.remove()
        return {"union_text_longer_by_one": seen.get("controlnet") == (seen.get("transformer") or 0) + 1}

    return CaseSetup(pipe, call, off=_scale_off(), off_description="controlnet_conditioning_scale=0",
                     extra_checks=checks, notes="union mode: one extra mode token in the ControlNet's text")


CASES = [
    Case("controlnet/canny", "controlnet", "FluxControlNetPipeline, Canny control image, CLEAR in the ControlNet too",
         lambda ctx: _prepare_single(ctx)),
    Case("controlnet/dense-controlnet", "controlnet", "as controlnet/canny, ControlNet left dense (controlnet=False)",
         lambda ctx: _prepare_single(ctx, dense=True)),
    Case("controlnet/multi", "controlnet", "FluxMultiControlNetModel with two ControlNets", _prepare_multi),
    Case("controlnet/union", "controlnet", "ControlNet-Union (num_mode=3, Canny mode)", _prepare_union),
]
