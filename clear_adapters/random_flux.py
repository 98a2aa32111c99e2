"""A FLUX.1-dev-shaped pipeline with random weights, built in place: speed measurements, no download.

The transformer (what every denoising step runs, and all of attention) and the VAE have the real
FLUX.1-dev configurations, so a step and a decode cost what they cost with the real weights: time
depends on shapes, not values. The two text encoders are one-layer stand-ins with the real output
widths (T5 4096, CLIP pooled 768) and the in-memory tokenizers of :mod:`clear_adapters.testing`:
text is encoded once per image, so only the whole-generation time leaves out the real encoders'
cost (T5-XXL: well under a second per prompt on a GPU). The text sequence has FLUX's 512 tokens.

Everything is created directly in the target dtype on the target device: the 11.9 B-parameter
transformer never exists in float32 or on the CPU (bf16 needs ~24 GB of device memory). Outputs
are noise; image comparisons on this pipeline prove nothing about quality.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import IncompatibleModelError

#: black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: black-forest-labs/FLUX.1-dev, vae/config.json
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    force_upcast=True, mid_block_add_attention=True)
#: black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@contextlib.contextmanager
def _building_in(device, dtype):
    """New parameters are created in ``dtype`` on ``device`` (no float32 CPU copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_flux_transformer(config: dict | None = None, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """``FluxTransformer2DModel`` (FLUX.1-dev config unless ``config``) with seeded random weights, in eval mode."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with _building_in(device, dtype):
        return FluxTransformer2DModel(**(config or FLUX_DEV_TRANSFORMER)).eval()


def _parameter_bytes(config: dict, dtype: torch.dtype) -> int:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        count = sum(p.numel() for p in FluxTransformer2DModel(**config).parameters())
    return count * torch.empty((), dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: line.split()[1] for line in f}
            return int(info["MemAvailable"]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def flux_dev_random_pipeline(*, device=None, dtype=None, seed: int = 0, vae: dict | None = None,
                             **transformer_overrides):
    """A ``FluxPipeline`` shaped like FLUX.1-dev with random weights (see the module docstring).

    Args:
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default bfloat16 (FLUX.1-dev's own dtype).
        seed: seeds every model's weights.
        vae: changes to the VAE config (a smoke test's smaller VAE; the pixels per token follow it).
        transformer_overrides: change the transformer config (e.g. fewer layers for a smoke test).

    Raises:
        IncompatibleModelError: the transformer's weights alone would not fit in the device's free
            memory (checked before anything is allocated).
    """
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .testing import _clip_tokenizer, _t5_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.bfloat16
    config = {**FLUX_DEV_TRANSFORMER, **transformer_overrides}
    need, free = _parameter_bytes(config, dtype), _free_bytes(device)
    if free is not None and need > free:
        raise IncompatibleModelError(
            f"the FLUX.1-dev-shaped transformer needs {need / 2**30:.1f} GiB for its weights in {dtype} but "
            f"{device} has {free / 2**30:.1f} GiB free; run it on a GPU with more memory")
    if config["in_channels"] != 4 * {**FLUX_DEV_VAE, **(vae or {})}["latent_channels"]:
        raise IncompatibleModelError("the transformer's in_channels must be 4 x the VAE's latent_channels")
    transformer = build_flux_transformer(config, device=device, dtype=dtype, seed=seed)
    torch.manual_seed(seed + 1)
    with _building_in(device, dtype):
        autoencoder = AutoencoderKL(**{**FLUX_DEV_VAE, **(vae or {})}).eval()
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=128, hidden_size=config["pooled_projection_dim"], intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=config["joint_attention_dim"], d_ff=64, d_kv=16,
                                     num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                     eos_token_id=1)).eval()
    pipe = diffusers.FluxPipeline(transformer=transformer, vae=autoencoder, text_encoder=clip,
                                  tokenizer=_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=_t5_tokenizer(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe
