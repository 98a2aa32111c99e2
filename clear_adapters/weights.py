"""Adapter state dicts: read (safetensors only), map onto a model, validate, apply and restore.

Upstream keys look like ``transformer_blocks.3.attn.to_q.weight`` and, for pooled variants,
``single_transformer_blocks.7.attn.processor.spatial_weight``. They are mapped onto the model as it
is now: a plain ``nn.Linear`` or the ``base_layer`` of a peft LoRA wrapper. Everything is checked
before anything is written, so a bad file leaves the model untouched.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import IncompatibleModelError, IntegrityError, UnsafeFormatError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SPATIAL_WEIGHT = "processor.spatial_weight"
_KEY = re.compile(r"^(?P<layer>(?:single_)?transformer_blocks\.\d+\.attn)\.(?P<rest>.+)$")


def attention_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every FLUX attention layer of ``model`` (``FluxAttention`` and look-alikes)."""
    layers = []
    for name, module in model.named_modules():
        if re.fullmatch(r"(?:single_)?transformer_blocks\.\d+\.attn", name) and hasattr(module, "to_q") \
                and hasattr(module, "processor"):
            layers.append((name, module))
    return layers


def check_safetensors_path(path: str | Path) -> Path:
    """Refuse pickle formats by name and by content; return the path of a readable safetensors file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"{path.name}: pickle-based checkpoints ({path.suffix}) are never loaded "
                                "(unpickling can run arbitrary code); convert it to .safetensors")
    if not path.is_file():
        raise FileNotFoundError(str(path))
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise UnsafeFormatError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; it is "
                                    "never unpickled — convert it to .safetensors")
        if len(head) < 8:
            raise IntegrityError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or fh.read(1) != b"{":
            raise IntegrityError(f"{path}: not a safetensors file (bad header)")
        fh.seek(8)
        try:
            json.loads(fh.read(length))
        except ValueError as exc:
            raise IntegrityError(f"{path}: corrupt safetensors header ({exc})") from None
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata header) of a safetensors adapter file."""
    from safetensors import safe_open

    path = check_safetensors_path(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for truncated data
        raise IntegrityError(f"{path}: cannot read safetensors data ({exc})") from None
    return tensors, metadata


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a leading ``transformer.`` (diffusers pipeline prefix) so keys match the model's names."""
    out = {}
    for key, value in state_dict.items():
        out[key[len("transformer."):] if key.startswith("transformer.") else key] = value
    return out


def infer_down_factor(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The down factor a checkpoint was trained with, read off its spatial weights (None if it has none)."""
    for key, value in state_dict.items():
        if key.endswith(SPATIAL_WEIGHT):
            return int(value.shape[3])
    return None


@dataclass
class WeightPlan:
    """What :func:`apply` will write: target tensor -> new value, per layer, plus spatial weights."""

    writes: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    spatial: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> (1,1,1,d,1,d,1)


def plan(model, state_dict: dict[str, torch.Tensor], down_factor: int, *, model_name: str = "transformer",
         layers: list[str] | None = None, base: dict[str, torch.Tensor] | None = None) -> WeightPlan:
    """Validate ``state_dict`` against ``model`` and return the writes, without changing anything.

    Every attention layer of the model (or of ``layers``) must be covered — ``to_q``/``to_k``/``to_v``
    (and ``to_out.0`` in double blocks) with matching shapes, plus a spatial weight per layer when
    ``down_factor > 1`` — and every key of the file must name something in the model.

    ``base`` switches to delta mode: the new value is ``current + (file - base)`` for each tensor
    (used for ControlNets and fine-tuned variants whose weights differ from the adapter's base).
    """
    state_dict = normalize_keys(state_dict)
    available = dict(attention_layers(model))
    if not available:
        raise IncompatibleModelError(f"{model_name} ({type(model).__name__}) has no FLUX attention layers "
                                     "(transformer_blocks.N.attn / single_transformer_blocks.N.attn)")
    wanted = list(available) if layers is None else layers
    result = WeightPlan()
    seen = set()
    for key in state_dict:
        match = _KEY.match(key)
        if not match:
            raise IncompatibleModelError(f"unexpected key {key!r} in the adapter: not a FLUX attention projection")
        if match["layer"] not in available:
            if layers is None:
                raise IncompatibleModelError(
                    f"the adapter has weights for {match['layer']}, which {model_name} does not have "
                    f"({len(available)} attention layers): it was made for a larger model")
            continue
    for layer in wanted:
        attn = available[layer]
        projections = [p for p in PROJECTIONS if p != "to_out.0" or hasattr(attn, "to_out")]
        for proj in projections:
            module = attn.get_submodule(proj)
            target = getattr(module, "base_layer", module)
            for pname, param in target.named_parameters(recurse=False):
                key = f"{layer}.{proj}.{pname}"
                if key not in state_dict:
                    raise IncompatibleModelError(f"the adapter is missing {key} (layer {layer} of {model_name} "
                                                 "would be left half-converted)")
                value = state_dict[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise IncompatibleModelError(
                        f"{key}: adapter tensor has shape {tuple(value.shape)}, {model_name} expects "
                        f"{tuple(param.shape)}; the adapter was made for a different model size")
                if base is None:
                    new = _merged_lora_delta(module, pname, value)
                else:  # the current weights already hold any fused LoRA
                    new = param.detach().float().cpu() + (value.float() - base[key].float())
                result.writes.append((f"{layer}.{proj}.{pname}", param, new))
                seen.add(key)
        spatial_key = f"{layer}.{SPATIAL_WEIGHT}"
        if down_factor > 1:
            if spatial_key not in state_dict:
                raise IncompatibleModelError(f"the adapter is missing {spatial_key} (needed for down_factor "
                                             f"{down_factor})")
            w = state_dict[spatial_key]
            if tuple(w.shape) != (1, 1, 1, down_factor, 1, down_factor, 1):
                raise IncompatibleModelError(f"{spatial_key} has shape {tuple(w.shape)}, expected "
                                             f"(1, 1, 1, {down_factor}, 1, {down_factor}, 1)")
            result.spatial[layer] = w
            seen.add(spatial_key)
        elif spatial_key in state_dict:
            raise IncompatibleModelError(f"the adapter has {spatial_key} but down_factor is 1; pass the "
                                         "down factor it was trained with")
    if layers is None:
        extra = sorted(set(state_dict) - seen)
        if extra:
            raise IncompatibleModelError(f"the adapter has {len(extra)} tensors that match nothing in "
                                         f"{model_name}, e.g. {extra[0]}")
    return result


def _merged_lora_delta(module, pname: str, value: torch.Tensor) -> torch.Tensor:
    """Keep LoRAs that were fused into this layer: new base = adapter weight + their merged delta."""
    merged = getattr(module, "merged_adapters", None)
    if not merged or pname != "weight":
        return value
    delta = sum(module.get_delta_weight(name).detach().float().cpu() for name in merged)
    return value.float() + delta


@dataclass
class AppliedWeights:
    """The originals of everything :func:`apply` overwrote (kept on the CPU), for a bit-exact restore."""

    # (param, original, fingerprint of what was written, the written value as given by the plan)
    entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]]


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    # Two weighted sums in float64 tell "still what we wrote" from "changed since" (a fused LoRA)
    # without keeping a second full copy of every tensor.
    flat = t.detach().flatten().double()
    ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * ramp).sum()]).cpu()


@torch.no_grad()
def apply(weight_plan: WeightPlan) -> AppliedWeights:
    """Write the plan into the model (cast to each parameter's dtype and device)."""
    entries = []
    for _, param, value in weight_plan.writes:
        original = param.detach().to("cpu", copy=True)
        try:
            param.copy_(value.to(device=param.device, dtype=param.dtype))
            entries.append((param, original, _fingerprint(param), value))
        except BaseException:  # e.g. out of memory half-way: nothing may stay half-written
            param.copy_(original.to(param.device))
            restore(AppliedWeights(entries))
            raise
    return AppliedWeights(entries)


@torch.no_grad()
def restore(applied: AppliedWeights) -> int:
    """Put the originals back; returns how many tensors had changed since (e.g. a LoRA fused later).

    A tensor still equal to what was written gets its original back bit for bit. One changed since
    keeps that change: it becomes original + (current - written), computed from the adapter value.
    """
    changed = 0
    for param, original, fingerprint, value in applied.entries:
        if torch.equal(_fingerprint(param), fingerprint):
            param.copy_(original.to(param.device))
        else:
            changed += 1
            written = value.to(device=param.device, dtype=param.dtype).float()
            param.copy_((original.to(param.device).float() + (param.float() - written)).to(param.dtype))
    return changed
