"""Distillation checkpoints: safetensors + JSON only (nothing is pickled, nothing is unpickled).

A checkpoint directory holds

* ``trainable.safetensors``: the student's trainable tensors under their published keys (full precision);
* ``optimizer.safetensors``: every tensor of the optimizer state (``state.<param index>.<name>``);
* ``rng.safetensors``: the torch CPU (and CUDA) generator states and numpy's key, per process;
* ``state.json``: step, data position, loss history, the first evaluation, elapsed time, the settings
  signature a resumed run must match, the optimizer's scalars and parameter groups, python's RNG state.

It is written into a temporary directory and renamed into place, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .errors import DistillationError

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "state.json"
FORMAT = "clear-distill-checkpoint"
FORMAT_VERSION = 1


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: the checkpoint itself or a distillation output holding one."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR):
        if (candidate / STATE_NAME).is_file():
            return candidate
    raise DistillationError(f"no distillation checkpoint at {path} (expected {path}/{CHECKPOINT_DIR}/{STATE_NAME}, "
                            "written every checkpoint_every steps and at the end of a run)")


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistillationError(f"{checkpoint / STATE_NAME}: unreadable ({exc})") from None
    if state.get("format") != FORMAT or not isinstance(state.get("format_version"), int) \
            or state["format_version"] > FORMAT_VERSION:
        raise DistillationError(f"{checkpoint / STATE_NAME} is not a distillation checkpoint this version reads")
    return state


# ---------------------------------------------------------------------------------------------- optimizer
def _split_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.state_dict()["param_groups"]):
        # JSON turned tuples (betas) into lists: give each value the type it has in a fresh optimizer
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------- RNG
def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": _jsonable(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    random.setstate(_tuples(meta["python"]))
    if "numpy" in tensors and "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------- save/load
def save_checkpoint(directory: Path, *, trainable: dict[str, torch.Tensor], optimizer, state: dict,
                    rank: int = 0, write_shared: bool = True) -> Path:
    """Write ``directory/checkpoint`` (atomically replacing an older one). ``state`` is JSON data.

    The main process (``write_shared``) writes everything and renames it into place; other processes
    of a multi-process run call this afterwards (after a barrier) to add their own RNG state.
    """
    from safetensors.torch import save_file

    target = Path(directory) / CHECKPOINT_DIR
    tmp = Path(directory) / f".{CHECKPOINT_DIR}.tmp"
    rng_tensors, rng_meta = _rng_tensors()
    if write_shared:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "optimizer": opt_meta,
                   "rng": {str(rank): rng_meta}}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        old = Path(directory) / f".{CHECKPOINT_DIR}.old"
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    else:
        save_file(rng_tensors, str(target / f"rng-{rank}.safetensors"))
        (target / f"rng-{rank}.json").write_text(json.dumps(rng_meta), encoding="utf-8")
    return target


def load_checkpoint(checkpoint: Path, *, optimizer, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, state) of a checkpoint; the optimizer state and this process's RNG are restored."""
    from safetensors.torch import load_file

    state = read_state(checkpoint)
    try:
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
        _join_optimizer(optimizer, load_file(str(checkpoint / "optimizer.safetensors")), state["optimizer"])
        rng_file = checkpoint / f"rng-{rank}.safetensors"
        if rng_file.is_file():
            rng_meta = state["rng"].get(str(rank))
            if rng_meta is None:
                rng_meta = json.loads((checkpoint / f"rng-{rank}.json").read_text(encoding="utf-8"))
            _restore_rng(load_file(str(rng_file)), rng_meta)
    except (OSError, KeyError, ValueError) as exc:
        raise DistillationError(f"checkpoint {checkpoint} is incomplete or damaged ({exc})") from None
    return trainable, state
