"""One resolver for the pipelines that commands run on: built-in names, local directories, Hub ids.

``demo``, ``generate``, ``matrix``, ``bench pipeline``, ``distill`` and the multi-GPU example all take
a ``--pipeline``/``--base`` string and hand it to :func:`load_pipeline`, so every command accepts the
same forms:

* a built-in name from :data:`BUILTIN_PIPELINES` (``"tiny"``: the random-weight mechanics bed of
  :mod:`clear_adapters.testing`; ``"toy"``: the trained miniature FLUX shipped in
  :mod:`clear_adapters.toy`; more are added by the modules that provide them);
* a local ``save_pretrained`` directory;
* a Hub model id (``"black-forest-labs/FLUX.1-dev"``), through ``DiffusionPipeline.from_pretrained``.

Built-ins are named by ``"module:function"`` strings and imported only when used: the CLI stays
light, and this table is constant data (no registration at import time, no global mutable state).
A builder that takes ``device``/``dtype`` keywords gets them and builds in place (a model too large
to exist first in float32 on the CPU); the others are built, then moved.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

#: Built-in pipeline names -> ``"module:function"`` building the pipeline (called with no argument).
BUILTIN_PIPELINES: dict[str, str] = {
    "tiny": "clear_adapters.testing:tiny_flux_pipeline",
    "toy": "clear_adapters.toy.pipeline:toy_pipeline",
    # FLUX.1-dev's transformer and VAE with random weights, built in place (bf16, ~24 GB): speed only
    "flux-dev-random": "clear_adapters.random_flux:flux_dev_random_pipeline",
}


def is_builtin(source: str) -> bool:
    """True when ``source`` names a built-in pipeline (not a directory or Hub id)."""
    return str(source) in BUILTIN_PIPELINES


def builtin_names() -> list[str]:
    return sorted(BUILTIN_PIPELINES)


def check_source(source: str | Path) -> bool:
    """Raise :class:`AdapterNotFoundError` unless ``source`` can name a pipeline; True when it is local.

    Cheap (no import, no download): commands call it before any work, so a typo is one clear error.
    """
    from .errors import AdapterNotFoundError

    name = str(source)
    if is_builtin(name):
        return False
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_local and not path.is_dir():
        raise AdapterNotFoundError(
            f"pipeline {name[:200]!r} is neither a built-in ({', '.join(builtin_names())}), a pipeline directory "
            "nor a Hub model id (owner/name)")
    return looks_local


def load_pipeline(source: str | Path, *, device: str | None = None, dtype=None, pipeline_class=None,
                  revision: str | None = None, token=None, local_files_only: bool = False,
                  progress: bool = False, **kwargs):
    """The diffusers pipeline ``source`` names, on ``device`` in ``dtype``.

    Args:
        source: a built-in name (see :data:`BUILTIN_PIPELINES`), a local pipeline directory or a Hub id.
        device: ``"cpu"``, ``"cuda"``, ...; default: leave where it was built/loaded (CPU).
        dtype: a ``torch.dtype`` or its name; default: built-ins keep theirs, others load as stored.
        pipeline_class: a diffusers pipeline class for directories and Hub ids (default
            ``DiffusionPipeline``: the class the repository's ``model_index.json`` names).
        revision, token, local_files_only: passed to ``from_pretrained``.
        progress: keep diffusers' per-step progress bar on.
        kwargs: more ``from_pretrained`` arguments (components to reuse, variant, ...).
    """
    import torch

    from .errors import ClearAdapterError

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    name = str(source)
    if is_builtin(name):
        module_name, function = BUILTIN_PIPELINES[name].split(":")
        builder = getattr(importlib.import_module(module_name), function)
        if {"device", "dtype"} <= set(inspect.signature(builder).parameters):
            pipe = builder(device=device, dtype=dtype)
        else:
            pipe = builder()
            if dtype is not None and getattr(pipe, "dtype", None) != dtype:  # diffusers warns on every cast
                pipe.to(dtype=dtype)
    else:
        path = Path(name).expanduser()
        looks_local = check_source(name)
        if pipeline_class is None:
            from diffusers import DiffusionPipeline as pipeline_class
        options = dict(kwargs)
        if dtype is not None:
            options["torch_dtype"] = dtype
        try:
            pipe = pipeline_class.from_pretrained(str(path) if looks_local else name, revision=revision,
                                                  token=token, local_files_only=local_files_only, **options)
        except (OSError, ValueError) as exc:  # diffusers reports a missing repo/file as OSError/ValueError
            raise ClearAdapterError(f"could not load pipeline {name!r}: {exc}") from exc
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
