"""Read only the base-model tensors an adapter touches (for ``weight_mode="delta"``).

A base can be a state dict, a diffusers model directory (the pipeline root with ``transformer/`` or the
transformer folder itself, sharded or not) or a Hub model id. Only the safetensors shards holding the
needed keys are opened, and only those keys are read from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import IncompatibleModelError
from .weights import check_safetensors_path, normalize_keys

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def load_base_tensors(base, keys: list[str], *, subfolder: str = "transformer", revision: str | None = None,
                      token=None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (upstream adapter names) of the base transformer, as float32 on CPU."""
    if isinstance(base, dict):
        tensors = normalize_keys(base)
        return {k: _need(tensors, k, "the base state dict").float() for k in keys}
    path = Path(str(base)).expanduser()
    if path.exists():
        folder = path / subfolder if (path / subfolder).is_dir() else path
        return _read_keys(keys, lambda name: folder / name, str(folder))

    from .hub import download

    return _read_keys(keys, lambda name: download(str(base), f"{subfolder}/{name}", revision=revision, token=token),
                      str(base))


def _read_keys(keys, locate, where: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        index = json.loads(Path(locate(INDEX_NAME)).read_text())["weight_map"]
    except (FileNotFoundError, OSError, KeyError, LookupError):
        index = None
    except Exception as exc:  # a Hub error for a missing index means: not sharded
        if type(exc).__name__ not in ("AdapterNotFoundError",):
            raise
        index = None
    by_file: dict[str, list[str]] = {}
    for key in keys:
        shard = WEIGHTS_NAME if index is None else index.get(key)
        if shard is None:
            raise IncompatibleModelError(f"the base model at {where} has no tensor {key}; is it a FLUX transformer?")
        by_file.setdefault(shard, []).append(key)
    out = {}
    for shard, wanted in by_file.items():
        file = check_safetensors_path(locate(shard))
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            available = set(fh.keys())
            for key in wanted:
                out[key] = _need_key(fh, available, key, where).float()
    return out


def _need(tensors, key, where):
    if key not in tensors:
        raise IncompatibleModelError(f"{where} has no tensor {key}")
    return tensors[key]


def _need_key(fh, available, key, where):
    if key not in available:
        raise IncompatibleModelError(f"the base model at {where} has no tensor {key}")
    return fh.get_tensor(key)
