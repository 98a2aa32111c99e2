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
