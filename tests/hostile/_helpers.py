"""Shared helpers of the hostile-input tests: bit-exact pipeline snapshots and crafted files."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import torch


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare raw bytes, not values: NaN != NaN and -0.0 == 0.0 would both fool torch.equal.
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).clone() if t.numel() else torch.empty(0, dtype=torch.uint8)


def _modules(pipe) -> dict[str, torch.nn.Module]:
    if isinstance(pipe, torch.nn.Module):
        return {"model": pipe}
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def snapshot(pipe) -> dict:
    """Every parameter and buffer (as bytes, with dtype/shape/device), every attention processor class and
    every CLEAR marker and hook of every model in ``pipe``."""
    snap = {}
    for component, model in _modules(pipe).items():
        for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                            ("buffer", model.named_buffers(remove_duplicate=False))):
            for name, t in named:
                snap[(component, kind, name)] = (t.dtype, tuple(t.shape), t.device.type, t.requires_grad, _bits(t))
        for name, module in model.named_modules():
            key = (component, "module", name)
            snap[key] = (type(getattr(module, "processor", None)).__name__,
                         tuple(a for a in ("_clear_handle", "_clear_context", "_clear_state") if hasattr(module, a)),
                         len(module._forward_pre_hooks), len(module._forward_hooks))
    return snap


def assert_unchanged(pipe, before: dict) -> None:
    """Fail unless ``pipe`` is bit-identical to ``snapshot(pipe)`` taken before."""
    after = snapshot(pipe)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))[:5]
    changed = []
    for key, old in before.items():
        new = after[key]
        if key[1] in ("param", "buffer"):
            same = old[:4] == new[:4] and torch.equal(old[4], new[4])
        else:
            same = old == new
        if not same:
            changed.append(key)
    assert not changed, f"{len(changed)} entries changed, e.g. {changed[:3]}"


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", *, declared_len: int | None = None,
                          pad_to: int | None = None) -> Path:
    """A safetensors-like file with exactly this header (dict or raw bytes) and data; for broken files."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_len is None else declared_len
    path = Path(path)
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    if pad_to is not None:
        with open(path, "r+b") as fh:
            fh.truncate(pad_to)  # sparse: no disk or memory used
    return path


def unique_repo(stem: str) -> str:
    return f"tester/{stem}-{uuid.uuid4().hex[:8]}"
