"""Tiny, offline FLUX pipelines and upstream-format CLEAR checkpoints, built in code.

Nothing here downloads anything: tokenizers are built from in-memory vocabularies, models from
configs with seeded random weights. A 2-level VAE makes one latent token cover 4x4 pixels, so a
64 x 64 px image is a 16 x 16 token grid. These are the fixtures of the test-suite and of
``clear-adapters demo``; they are public so users can reproduce bug reports without weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .weights import attention_layers

#: Pixels per latent token of the tiny pipeline (VAE factor 2 x FLUX patchify 2).
TINY_PIXELS_PER_TOKEN = 4

_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "green", "house", "tree", "sky", "sea",
          "mountain", "city", "night", "day", "painting", "portrait", "forest", "river", "sun", "moon"]


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in _WORDS:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    pieces += [(ch, -100.0) for ch in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -50.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_flux_transformer(seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2,
                          guidance_embeds: bool = True, in_channels: int = 16, **overrides):
    """A FluxTransformer2DModel with 2 heads x 16 dims and seeded random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = dict(patch_size=1, in_channels=in_channels, num_layers=num_layers,
                  num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                  axes_dims_rope=(4, 6, 6))
    config.update(overrides)
    return FluxTransformer2DModel(**config).eval()


def tiny_flux_pipeline(seed: int = 0, *, controlnet: bool | int = False, guidance_embeds: bool = True,
                       pipeline_class=None, **overrides):
    """A complete FLUX pipeline (< 1 MB, ~0.1 s per 2-step image at 64 px on a CPU).

    Args:
        seed: seeds every model's random weights.
        controlnet: ``True`` (or a number of nets) builds a ``FluxControlNetPipeline`` with a
            ControlNet made from the transformer (1 double + 1 single block), its zero-initialised
            output layers re-initialised so it visibly changes the image. ``2`` or more builds a
            ``FluxMultiControlNetModel``.
        guidance_embeds: ``False`` gives a schnell-like transformer without guidance embedding.
        pipeline_class: another FLUX pipeline class taking the same components (e.g. img2img).
        overrides: passed to the transformer config.
    """
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    in_channels = overrides.pop("in_channels", 16)
    transformer = tiny_flux_transformer(seed, guidance_embeds=guidance_embeds, in_channels=in_channels,
                                        **overrides)
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=in_channels // 4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    components = dict(transformer=transformer, text_encoder=clip, text_encoder_2=t5, tokenizer=_clip_tokenizer(),
                      tokenizer_2=_t5_tokenizer(), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler())
    cls = pipeline_class or diffusers.FluxPipeline
    if controlnet:
        from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

        nets = []
        for i in range(1 if controlnet is True else int(controlnet)):
            torch.manual_seed(seed + 10 + i)
            net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=16, num_attention_heads=2)
            for module in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
                torch.nn.init.normal_(module.weight, std=0.3)
                torch.nn.init.normal_(module.bias, std=0.1)
            nets.append(net.eval())
        components["controlnet"] = nets[0] if controlnet is True else FluxMultiControlNetModel(nets)
        cls = pipeline_class or FluxControlNetPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_reference_checkpoint(path: str | os.PathLike, transformer, window_size: int | float, down_factor: int = 1,
                               seed: int = 0, scale: float = 0.05) -> Path:
    """Write a CLEAR checkpoint for ``transformer`` in exactly the upstream key layout.

    Keys: ``transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0}.{weight,bias}``,
    ``single_transformer_blocks.{i}.attn.{to_q,to_k,to_v}.{weight,bias}`` and, for ``down_factor > 1``,
    ``{layer}.attn.processor.spatial_weight`` of shape (1, 1, 1, d, 1, d, 1). Values are the model's
    own projections plus seeded noise of relative size ``scale`` (like a distilled adapter, close to
    its teacher); the spatial weights are 1/d^2 plus noise. The metadata header records the window.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, attn in attention_layers(transformer):
        projections = ["to_q", "to_k", "to_v"] + (["to_out.0"] if hasattr(attn, "to_out") else [])
        for proj in projections:
            module = attn.get_submodule(proj)
            module = getattr(module, "base_layer", module)
            for pname, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen) * scale * param.detach().float().std()
                tensors[f"{name}.{proj}.{pname}"] = (param.detach().float().cpu() + noise).contiguous()
        if down_factor > 1:
            d = down_factor
            base = torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d))
            tensors[f"{name}.processor.spatial_weight"] = base + 0.01 * torch.randn(base.shape, generator=gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "window_size": str(window_size),
                                            "down_factor": str(down_factor), "producer": "clear_adapters.testing"})
    return path


# ---------------------------------------------------------------------------------------------------------
# Fixtures for the compatibility matrix (plugins and variants), all offline and seeded.
def tiny_test_image(size: int = 64, seed: int = 0):
    """A drawn RGB PIL image (gradient sky, sun, house, tree, ground) with edges for Canny to find."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    jitter = [int(v) for v in torch.randint(-size // 16, size // 16 + 1, (6,), generator=gen)]
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):  # vertical gradient: smooth regions where CLEAR's window matters least
        draw.line([(0, y), (size, y)], fill=(90 + 100 * y // size, 140 + 60 * y // size, 230 - 80 * y // size))
    s = size / 64
    draw.rectangle([0, int(46 * s), size, size], fill=(70, 140, 60))
    draw.ellipse([int((44 + jitter[0]) * s), int((6 + jitter[1]) * s), int((58 + jitter[0]) * s),
                  int((20 + jitter[1]) * s)], fill=(250, 220, 60))
    x0 = int((10 + jitter[2]) * s)
    draw.rectangle([x0, int(28 * s), x0 + int(22 * s), int(48 * s)], fill=(200, 60, 50), outline=(40, 20, 20))
    draw.polygon([(x0 - int(3 * s), int(28 * s)), (x0 + int(11 * s), int(16 * s)), (x0 + int(25 * s), int(28 * s))],
                 fill=(120, 40, 40))
    draw.rectangle([x0 + int(8 * s), int(38 * s), x0 + int(13 * s), int(48 * s)], fill=(60, 40, 30))
    tx = int((46 + jitter[3]) * s)
    draw.rectangle([tx, int(34 * s), tx + int(3 * s), int(50 * s)], fill=(90, 60, 30))
    draw.ellipse([tx - int(6 * s), int(22 * s), tx + int(9 * s), int(38 * s)], fill=(30, 110, 40))
    return img


def tiny_image_encoder(seed: int = 0, image_size: int = 32, projection_dim: int = 32):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) small enough for tests, from a config.

    Register both on a pipeline with ``pipe.register_modules(image_encoder=..., feature_extractor=...)``
    before ``load_ip_adapter`` so diffusers does not try to download an encoder.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:  # transformers 5 without torchvision: the PIL processor, same behaviour without the warning
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=projection_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=image_size, patch_size=8, num_channels=3)).eval()
    processor = Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return encoder, processor


def tiny_ip_adapter_state_dict(transformer, image_embed_dim: int = 32, num_tokens: int = 4, seed: int = 0,
                               std: float = 0.3) -> dict[str, torch.Tensor]:
    """IP-Adapter weights for ``transformer`` in the diffusers FLUX file format.

    Keys: ``image_proj.proj.{weight,bias}`` ((num_tokens * joint_attention_dim, image_embed_dim)),
    ``image_proj.norm.{weight,bias}`` and ``ip_adapter.{i}.to_{k,v}_ip.{weight,bias}`` for each double
    block i (the IP branch only lives in double blocks). ``num_tokens`` must be 4 (or 16 for the
    "plus" layout) — diffusers infers it from the projection's size.
    """
    gen = torch.Generator().manual_seed(seed)
    cross = transformer.config.joint_attention_dim
    hidden = transformer.inner_dim

    def randn(*shape, scale=std):
        return (torch.randn(shape, generator=gen) * scale).contiguous()

    tensors = {"image_proj.proj.weight": randn(num_tokens * cross, image_embed_dim),
               "image_proj.proj.bias": randn(num_tokens * cross, scale=0.05),
               "image_proj.norm.weight": 1.0 + randn(cross, scale=0.05),
               "image_proj.norm.bias": randn(cross, scale=0.05)}
    for i in range(transformer.config.num_layers):
        for proj in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{i}.{proj}.weight"] = randn(hidden, cross)
            tensors[f"ip_adapter.{i}.{proj}.bias"] = randn(hidden, scale=0.05)
    return tensors


def write_tiny_ip_adapter(path: str | os.PathLike, transformer, image_embed_dim: int = 32, seed: int = 0) -> Path:
    """Save :func:`tiny_ip_adapter_state_dict` as a safetensors file for ``pipe.load_ip_adapter(dir, name)``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_ip_adapter_state_dict(transformer, image_embed_dim, seed=seed), str(path),
              metadata={"format": "pt"})
    return path


def tiny_lora_state_dict(transformer, rank: int = 4, seed: int = 0, scale: float = 1.0,
                         target_modules=("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, torch.Tensor]:
    """peft LoRA weights for a copy of ``transformer`` (``transformer`` itself is not changed).

    Both LoRA matrices are random (``init_lora_weights=False``) so the LoRA visibly changes the image;
    ``scale`` multiplies ``lora_B``.
    """
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    scratch = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    scratch.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules),
                                   init_lora_weights=False))
    state = get_peft_model_state_dict(scratch)
    return {k: (v * scale if "lora_B" in k else v).detach().clone().contiguous() for k, v in state.items()}


def write_tiny_lora(directory: str | os.PathLike, transformer, rank: int = 4, seed: int = 0,
                    scale: float = 1.0) -> Path:
    """Save a tiny LoRA with ``FluxPipeline.save_lora_weights``; load it with ``pipe.load_lora_weights(dir)``."""
    from diffusers import FluxPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(directory), transformer_lora_layers=tiny_lora_state_dict(
        transformer, rank=rank, seed=seed, scale=scale))
    return directory


def tiny_finetuned_transformer(transformer, seed: int = 1, scale: float = 0.05):
    """A "fine-tuned" copy of ``transformer``: every weight moved by seeded noise of relative size ``scale``."""
    import copy

    variant = copy.deepcopy(transformer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in variant.parameters():
            if param.numel() > 1:
                param.add_(torch.randn(param.shape, generator=gen) * scale * param.detach().float().std())
    return variant


def tiny_flux_fill_pipeline(seed: int = 0):
    """A ``FluxFillPipeline``: its transformer takes the latents, the masked-image latents and the packed
    mask concatenated on channels (16 + 16 + 16 = 48 inputs at this size) and predicts 16 channels."""
    from diffusers import FluxFillPipeline

    base = tiny_flux_pipeline(seed)
    latent_channels = base.vae.config.latent_channels
    mask_channels = 4 * base.vae_scale_factor ** 2  # the mask is packed from pixel space by 2x2 patches
    in_channels = 2 * 4 * latent_channels + mask_channels
    transformer = tiny_flux_transformer(seed, in_channels=in_channels, out_channels=4 * latent_channels)
    # Like FLUX.1-Fill-dev, a fine-tune of the base: every layer except the wider input layer starts
    # from the base transformer (and so does a CLEAR adapter written for it).
    base_state = base.transformer.state_dict()
    own = transformer.state_dict()
    transformer.load_state_dict({k: v for k, v in base_state.items() if k in own and own[k].shape == v.shape},
                                strict=False)
    components = {**base.components, "transformer": transformer}
    components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_controlnet_outputs(controlnet, seed: int = 0, std: float = 0.3):
    """Re-initialise a ControlNet's zero-initialised output layers so it visibly changes the image."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks,
                       controlnet.controlnet_x_embedder]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * std / 3)
    return controlnet
