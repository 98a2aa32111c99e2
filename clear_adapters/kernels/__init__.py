"""CLEAR attention kernels (pure torch): one entry point, three exact backends.

``clear_attention(q, k, v, geometry, config)`` takes (B, H, N, D) tensors in the canonical token order
of ``geometry`` (text, then image grids row-major) or in any order given by ``query_index`` /
``key_index`` (positions in the canonical sequence), which also lets a caller pass a partial
sequence (a band of query rows against a band of key rows, as sequence-parallel inference needs).
With ``return_lse=True`` it also returns the float32 log-sum-exp (B, H, Nq) so partial results over
disjoint key sets can be merged exactly.

Backends: ``dense`` (masked SDPA, the reference), ``tiled`` (linear, differentiable, default on CPU),
``flex`` (FlexAttention + block-sparse mask in 2-D tile order, default on CUDA).
"""

from __future__ import annotations

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import check_qkv, normalize_extra_mask
from .dense import DEFAULT_CHUNK, dense_attention
from .flex import block_efficiency, flex_attention_clear
from .tiled import tiled_attention

__all__ = ["clear_attention", "resolve_backend", "merge_partials", "block_efficiency", "flex_available"]


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, geometry: Geometry, *, partial: bool = False,
                    has_mask: bool = False, needs_grad: bool = False) -> str:
    """The backend ``"auto"`` stands for on ``device`` (explicit names are checked, not changed)."""
    structured = geometry.grids is not None
    if backend == "auto":
        if partial or not structured:
            return "dense"
        if device.type == "cuda" and flex_available() and not has_mask:
            return "flex"
        return "tiled"
    if backend in ("tiled", "flex") and not structured:
        raise ValueError(f"backend {backend!r} needs image tokens laid out as row-major grids; "
                         f"got {geometry.describe()}; use backend='dense'")
    if backend == "flex":
        if not flex_available():
            raise RuntimeError("backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if has_mask:
            raise ValueError("backend 'flex' does not combine a caller attention_mask; use 'tiled' or 'dense'")
        if needs_grad and device.type == "cpu":
            raise RuntimeError("FlexAttention has no CPU backward; use backend='tiled' for training on CPU")
    return backend


def clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry,
                    config: ClearConfig, *, backend: str | None = None, spatial_weight: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, query_index: torch.Tensor | None = None,
                    key_index: torch.Tensor | None = None, return_lse: bool = False, scale: float | None = None):
    """CLEAR attention. Returns (B, H, Nq, D), or ``(out, lse)`` with ``return_lse``.

    Args:
        query, key, value: (B, H, N, D); N = ``geometry.total_len`` unless indices are given.
        geometry: token positions (see :class:`~clear_adapters.geometry.Geometry`).
        config: window, down factor, scale mode; ``config.backend`` unless ``backend`` overrides it.
        spatial_weight: learned pooling weight (1, 1, 1, d, 1, d, 1) when ``config.down_factor > 1``.
        attention_mask: the caller's mask over (queries, keys) — boolean (True = attend) or additive —
            combined with the CLEAR pattern (e.g. Chroma's padding mask), never replacing it.
        query_index, key_index: canonical positions of the given tokens (any order, any subset).
        return_lse: also return the log-sum-exp per query (float32).
        scale: logit scale; default from ``config`` for the full sequence length of ``geometry``.
    """
    check_qkv(query, key, value)
    nq_full = geometry.total_len
    full_q = query_index is None or _is_permutation(query_index, nq_full)
    full_k = key_index is None or _is_permutation(key_index, nq_full)
    if query_index is None and query.shape[2] != nq_full:
        raise ValueError(f"query has {query.shape[2]} tokens but the geometry has {nq_full} "
                         f"({geometry.describe()}); pass query_index for partial sequences")
    if key_index is None and key.shape[2] != nq_full:
        raise ValueError(f"key has {key.shape[2]} tokens but the geometry has {nq_full}; pass key_index")
    if query_index is not None and query_index.numel() != query.shape[2]:
        raise ValueError("query_index must have one entry per query token")
    if key_index is not None and key_index.numel() != key.shape[2]:
        raise ValueError("key_index must have one entry per key token")
    attention_mask = normalize_extra_mask(attention_mask, query.shape[2], key.shape[2], query.shape[0])
    if scale is None:
        scale = config.softmax_scale(query.shape[-1], nq_full)
    partial = not (full_q and full_k)
    name = resolve_backend(backend or config.backend, query.device, geometry, partial=partial,
                           has_mask=attention_mask is not None,
                           needs_grad=torch.is_grad_enabled() and query.requires_grad)
    common = dict(scale=scale, spatial_weight=spatial_weight, return_lse=return_lse)
    if name == "dense":
        # chunked so the mask never exceeds DEFAULT_CHUNK x keys (dense is also the fallback of "auto")
        return dense_attention(query, key, value, geometry, config, attention_mask=attention_mask,
                               query_index=query_index, key_index=key_index, chunk_size=DEFAULT_CHUNK, **common)
    if partial:
        raise ValueError(f"backend {name!r} needs the full sequence (in any order); use 'dense' for partial ones")
    # Full sequences in another order: run in canonical order, then put the rows back.
    if query_index is not None:
        query = _to_canonical(query, query_index)
    if key_index is not None:
        key, value = _to_canonical(key, key_index), _to_canonical(value, key_index)
    if attention_mask is not None and (query_index is not None or key_index is not None):
        attention_mask = _mask_to_canonical(attention_mask, query_index, key_index)
    if name == "tiled":
        result = tiled_attention(query, key, value, geometry, config, attention_mask=attention_mask, **common)
    else:
        result = flex_attention_clear(query, key, value, geometry, config, **common)
    if query_index is None:
        return result
    qi = query_index.to(query.device)
    if return_lse:
        return result[0].index_select(2, qi), result[1].index_select(2, qi)
    return result.index_select(2, qi)


def merge_partials(outputs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Merge attention results over disjoint key sets exactly: (out, lse) of the union."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(o.float() * torch.exp(l - lse)[..., None] for o, l in zip(outputs, lses))
    return out.to(outputs[0].dtype), lse


def _is_permutation(index: torch.Tensor, n: int) -> bool:
    if index.numel() != n:
        return False
    seen = torch.zeros(n, dtype=torch.bool)
    seen[index.cpu()] = True
    return bool(seen.all())


def _to_canonical(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return x.index_select(2, inverse.to(x.device))


def _mask_to_canonical(mask, query_index, key_index):
    if query_index is not None and mask.shape[-2] != 1:
        mask = _to_canonical(mask, query_index)
    if key_index is not None:
        mask = _to_canonical(mask.transpose(-1, -2), key_index).transpose(-1, -2)
    return mask
