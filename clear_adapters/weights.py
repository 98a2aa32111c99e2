"""Adapter state dicts: read (safetensors only), map onto a model, validate, apply and restore.

Upstream keys look like ``transformer_blocks.3.attn.to_q.weight`` and, for pooled variants,
``single_transformer_blocks.7.attn.processor.spatial_weight``. They are mapped onto the model as it
is now: a plain ``nn.Linear`` or the ``base_layer`` of a peft LoRA wrapper. Everything is checked
before anything is written, so a bad file leaves the model untouched.
"""

from __future__ import annotations

import json
import math
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterNotFoundError, IncompatibleModelError, IntegrityError, InvalidAdapterError, UnsafeFormatError

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


#: safetensors refuses headers above this size (its own ``MAX_HEADER_SIZE``); so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
#: Bytes per element of the safetensors dtypes (sub-byte and unknown ones are not size-checked).
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8}
#: Adapter tensors must be real floating point: integers, bools or float8 would be silently cast.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shown(path) -> str:
    text = str(path)
    return text if len(text) <= 160 else f"{text[:80]}...{text[-60:]}"  # a hostile name must not flood a message


def check_safetensors_path(path: str | Path) -> Path:
    """Refuse pickle formats by name and by content; return the path of a valid safetensors file.

    The header is validated completely (size cap, JSON, every tensor's dtype, shape and offsets
    covering the data exactly) without reading any tensor, so a broken or crafted file is an
    :class:`IntegrityError` naming it rather than a reader error later.
    """
    safetensors_header(path)
    return Path(path)


def safetensors_header(path: str | Path) -> dict:
    """The validated header of a safetensors file (``__metadata__`` included), without reading tensors."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"{path.name}: pickle-based checkpoints ({path.suffix}) are never loaded "
                                "(unpickling can run arbitrary code); convert it to .safetensors")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AdapterNotFoundError(f"no such file: {_shown(path)}") from None
    except (OSError, ValueError) as exc:  # name too long, loops of symlinks, permissions, NUL in the name
        raise AdapterNotFoundError(f"cannot read {_shown(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        # a FIFO would block and /dev/zero never ends: only regular files are opened
        raise InvalidAdapterError(f"{_shown(path)} is not a regular file (a directory, pipe or device); "
                                  "name a .safetensors file")
    size = info.st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise UnsafeFormatError(f"{_shown(path)}: this is a pickle/zip (torch.save) file, not safetensors; it "
                                        "is never unpickled — convert it to .safetensors")
            if len(head) < 8:
                raise IntegrityError(f"{_shown(path)}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise IntegrityError(f"{_shown(path)}: declares a header of {length} bytes, more than the "
                                     f"{MAX_HEADER_BYTES} safetensors allows; not a safetensors file")
            if length > size - 8 or fh.read(1) != b"{":
                raise IntegrityError(f"{_shown(path)}: not a safetensors file or truncated (bad header)")
            fh.seek(8)
            raw = fh.read(length)
    except OSError as exc:
        raise IntegrityError(f"cannot read {_shown(path)}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise IntegrityError(f"{_shown(path)}: corrupt safetensors header ({reason})") from None
    _check_header(header, size - 8 - length, _shown(path))
    return header


def _check_header(header, data_size: int, where: str) -> None:
    """The layout rules safetensors enforces, checked here so violations name the file and tensor."""
    if not isinstance(header, dict):
        raise IntegrityError(f"{where}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{where}: corrupt safetensors header (__metadata__ must map names to strings)")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(shape, list)
                and all(_is_count(n) for n in shape) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(n) for n in offsets) and offsets[0] <= offsets[1]):
            raise IntegrityError(f"{where}: corrupt safetensors header entry for tensor {key!r} (expected dtype, "
                                 "shape and data_offsets)")
        item = _ITEM_BYTES.get(entry["dtype"])
        if item is not None and offsets[1] - offsets[0] != math.prod(shape) * item:
            raise IntegrityError(f"{where}: tensor {key!r} has data_offsets {offsets} that do not match its "
                                 f"shape {shape} and dtype {entry['dtype']}; the file is corrupt")
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise IntegrityError(f"{where}: tensor {key!r} has data_offsets [{begin}, {end}] that "
                                 f"{'overlap another tensor' if begin < position else 'leave a gap'}; the file is "
                                 "corrupt")
        position = end
    if position != data_size:
        raise IntegrityError(f"{where}: the tensors' data_offsets cover {position} bytes but the file holds "
                             f"{data_size}; it is truncated or corrupt")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata header) of a safetensors adapter file, each tensor checked.

    Tensors must be floating point (16-64 bit) and finite: an integer, bool or float8 tensor would be
    cast silently, and a NaN or Inf would poison the model.
    """
    from safetensors import safe_open

    path = check_safetensors_path(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for truncated data
        raise IntegrityError(f"{_shown(path)}: cannot read safetensors data ({exc})") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise InvalidAdapterError(f"{path.name}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; "
                                      "adapter tensors must be float16, bfloat16, float32 or float64")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidAdapterError(f"{path.name}: tensor {key} is not finite (holds NaN or Inf); the adapter "
                                      "file is corrupt")
    return tensors, metadata


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a leading ``transformer.`` (diffusers pipeline prefix) so keys match the model's names.

    A file holding one tensor under both spellings is refused: which copy would win is arbitrary.
    """
    out, origin = {}, {}
    for key, value in state_dict.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name in out:
            raise InvalidAdapterError(f"the adapter holds {name} twice, as {origin[name]!r} and {key!r}; keep one")
        out[name], origin[name] = value, key
    return out


def infer_down_factor(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The down factor a checkpoint was trained with, read off its spatial weights (None if it has none)."""
    found = None
    for key, value in state_dict.items():
        if key.endswith(SPATIAL_WEIGHT):
            shape = tuple(value.shape)
            if len(shape) != 7 or shape[3] != shape[5] or shape[3] < 2 or any(shape[i] != 1 for i in (0, 1, 2, 4, 6)):
                raise InvalidAdapterError(f"{key} has shape {shape}; pooling weights have shape "
                                          "(1, 1, 1, d, 1, d, 1) with d >= 2")
            if found is not None and shape[3] != found:
                raise InvalidAdapterError(f"the adapter's pooling weights disagree on the down factor "
                                          f"({found} and {shape[3]} in {key})")
            found = shape[3]
    return found


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
                _check_representable(key, new, param.dtype, model_name)
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


def _check_representable(key: str, value: torch.Tensor, dtype: torch.dtype, model_name: str) -> None:
    # Finite in float32 may still overflow to Inf in the model's float16 (or a delta may): refuse here,
    # before anything is written, rather than install Inf/NaN that generation then spreads.
    if not bool(torch.isfinite(value.to(dtype)).all()):
        detail = "" if dtype == value.dtype else f" in {model_name}'s {str(dtype).removeprefix('torch.')}"
        raise InvalidAdapterError(f"{key}: the value to write is not finite{detail} (largest magnitude "
                                  f"{value.float().abs().nan_to_num(float('inf')).max().item():.3g}); the adapter "
                                  "does not fit this model's precision")


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


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    # Two integer sums over the raw bits tell "still what we wrote" from "changed since" (a fused LoRA)
    # without keeping a second full copy of every tensor. Bits, not values: NaN != NaN would make an
    # untouched tensor look changed, and -0.0 == 0.0 would hide a change. Integer sums (wrapping) are
    # exact and order-independent, so the same bits give the same fingerprint on any device.
    flat = t.detach().reshape(-1)
    bits = flat.view(_SAME_SIZE_INT[flat.element_size()]).to(torch.int64)
    ramp = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    return torch.stack([bits.sum(), (bits * ramp).sum()]).cpu()


@torch.no_grad()
def apply(weight_plan: WeightPlan, applied: AppliedWeights | None = None) -> AppliedWeights:
    """Write the plan into the model (cast to each parameter's dtype and device).

    Each write is recorded in ``applied`` (a new one by default) as it happens, so a caller that
    registered ``applied`` first can undo an interrupted call; on any exception (Ctrl-C included)
    this call itself restores what it wrote before re-raising.
    """
    applied = AppliedWeights([]) if applied is None else applied
    first = len(applied.entries)
    for _, param, value in weight_plan.writes:
        original = param.detach().to("cpu", copy=True)
        try:
            param.copy_(value.to(device=param.device, dtype=param.dtype))
            applied.entries.append((param, original, _fingerprint(param), value))
        except BaseException:  # e.g. out of memory half-way: nothing may stay half-written
            if not applied.entries or applied.entries[-1][0] is not param:
                param.copy_(original.to(param.device))
            restore(AppliedWeights(applied.entries[first:]))
            del applied.entries[first:]
            raise
    return applied


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
