"""Loading the shipped toy pipeline and its plugins (offline, from the package directory).

The weights live in ``clear_adapters/toy/toy-weights/`` (package data, fp16 safetensors):

* ``pipeline/``: the ``FluxPipeline`` ``save_pretrained`` directory (``model_index.json``, tokenizers, text
  encoders, VAE, transformer, scheduler), loaded with ``FluxPipeline.from_pretrained(dir,
  local_files_only=True)`` -- the same code path as FLUX.1-dev;
* ``variant/``: a fine-tuned variant pipeline (learned the colour word ``cyan``);
* ``lora/``: a LoRA in diffusers format (``pipe.load_lora_weights``), trigger word ``snowy``;
* ``controlnet/``: a ``FluxControlNetModel`` following Canny edges of the shapes;
* ``clear-r4/``, ``clear-r2/``: CLEAR adapters distilled with ``clear-adapters distill``.

The toy was trained at :data:`HEIGHT` x :data:`WIDTH` px with :data:`MAX_SEQUENCE_LENGTH` T5 tokens:
pass those (``toy_call_kwargs`` does) -- diffusers' defaults (1024 px, 512 tokens) are outside what it knows.
"""

from __future__ import annotations

from pathlib import Path

#: What the toy was trained on: 32 x 32 px (16 x 16 tokens), 32 T5 tokens; sampled with 8 Euler steps.
HEIGHT = WIDTH = 32
MAX_SEQUENCE_LENGTH = 32
STEPS = 8
PIXELS_PER_TOKEN = 2

# "toy-weights" is no Python identifier, so setuptools does not take its folders for packages (it warns then)
WEIGHTS_DIR = Path(__file__).resolve().parent / "toy-weights"
PLUGINS = ("pipeline", "variant", "lora", "controlnet", "clear-r4", "clear-r2")


def weights_path(name: str = "pipeline") -> Path:
    """The shipped directory of ``name`` (one of :data:`PLUGINS`); a clear error when it is missing."""
    from ..errors import AdapterNotFoundError

    if name not in PLUGINS:
        raise AdapterNotFoundError(f"the toy has no {name!r}; it ships {', '.join(PLUGINS)}")
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        raise AdapterNotFoundError(f"toy weights {name!r} are not installed at {path}; rebuild them with "
                                   "'python examples/toy/train.py' or reinstall clear-adapters")
    return path


def toy_call_kwargs(**overrides) -> dict:
    """Pipeline-call arguments the toy was trained for (size, T5 length, steps); ``overrides`` win."""
    return {"height": HEIGHT, "width": WIDTH, "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "num_inference_steps": STEPS, **overrides}


def _load(cls, name: str, dtype, **kwargs):
    import torch

    pipe = cls.from_pretrained(str(weights_path(name)), local_files_only=True, torch_dtype=dtype or torch.float32,
                               **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_pipeline(dtype=None):
    """The trained toy ``FluxPipeline`` (float32 by default: fp16 matmuls are slow or missing on CPUs)."""
    from diffusers import FluxPipeline

    return _load(FluxPipeline, "pipeline", dtype)


def toy_variant_pipeline(dtype=None):
    """The fine-tuned variant (knows ``cyan``), a full ``FluxPipeline`` like a real fine-tune on the Hub."""
    from diffusers import FluxPipeline

    return _load(FluxPipeline, "variant", dtype)


def toy_controlnet(dtype=None):
    """The toy's ``FluxControlNetModel`` (Canny edges of the shapes as its control image)."""
    import torch
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_pretrained(str(weights_path("controlnet")), local_files_only=True,
                                               torch_dtype=dtype or torch.float32).eval()


def toy_controlnet_pipeline(dtype=None, base=None):
    """A ``FluxControlNetPipeline`` from the toy's components (or ``base``'s) and its ControlNet."""
    from diffusers import FluxControlNetPipeline

    base = base or toy_pipeline(dtype)
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = FluxControlNetPipeline(**components, controlnet=toy_controlnet(dtype or base.transformer.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_path() -> Path:
    """Directory of the toy's LoRA (``pipe.load_lora_weights(lora_path())``), trigger word ``snowy``."""
    return weights_path("lora")


def clear_adapter_path(window_size: int = 4) -> Path:
    """Directory of the distilled CLEAR adapter for window ``window_size`` (4 or 2)."""
    return weights_path(f"clear-r{window_size}")
