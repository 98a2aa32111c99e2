"""Pieces every kernel shares: masked attention with optional log-sum-exp, K/V pooling, mask merging."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import Geometry


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float, return_lse: bool = False):
    """Softmax attention on (..., N, D) tensors; ``mask`` is boolean (True = attend) or additive float.

    Without ``return_lse`` this is fused SDPA. With it, the math is spelled out (SDPA does not return
    the log-sum-exp on every device); the LSE is float32, shape (..., Nq).
    """
    if not return_lse:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, value.float()).to(value.dtype)
    return out, lse


def merge_masks(pattern: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Combine the boolean CLEAR pattern with a caller's mask (bool: AND; float: add -inf where not allowed)."""
    if extra is None:
        return pattern
    if extra.dtype == torch.bool:
        return pattern & extra
    return extra + _additive(pattern, extra.dtype)


def _additive(pattern: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(pattern.shape, dtype=dtype, device=pattern.device).masked_fill(~pattern, float("-inf"))


def pad_extra_mask(extra: torch.Tensor | None, pooled: int) -> torch.Tensor | None:
    """Extend a caller's (..., Nq, Nk) mask with ``pooled`` always-allowed key columns."""
    if extra is None or pooled == 0:
        return extra
    fill = torch.ones if extra.dtype == torch.bool else torch.zeros
    cols = fill((*extra.shape[:-1], pooled), dtype=extra.dtype, device=extra.device)
    return torch.cat([extra, cols], dim=-1)


def normalize_extra_mask(mask: torch.Tensor | None, nq: int, nk: int, batch: int) -> torch.Tensor | None:
    """Bring a diffusers ``attention_mask`` to 4-D (B|1, H|1, Nq, Nk), checking the sequence sizes.

    As diffusers' native backend reads them: 2-D is (B, Nk) key padding when it has that shape, else
    (Nq, Nk); 3-D is (B, Nq, Nk).
    """
    if mask is None:
        return None
    if mask.ndim == 1:
        mask = mask[None, None, None]
    elif mask.ndim == 2:
        mask = mask[:, None, None] if tuple(mask.shape) == (batch, nk) else mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.shape[-1] != nk or mask.shape[-2] not in (1, nq):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match {nq} queries x {nk} keys")
    return mask


def pooled_kv(key: torch.Tensor, value: torch.Tensor, geometry: Geometry, down_factor: int,
              spatial_weight: torch.Tensor | None):
    """Pool each image grid's K and V by ``d x d`` blocks with the learned weight; (B, H, P, D) each.

    ``key``/``value`` are full canonical sequences (B, H, T + N, D). The weight has the upstream shape
    (1, 1, 1, d, 1, d, 1) and multiplies (B, H, h/d, d, w/d, d, D) blocks before summing over each block.
    """
    d = down_factor
    if spatial_weight is None:
        spatial_weight = torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d))
    if tuple(spatial_weight.shape) != (1, 1, 1, d, 1, d, 1):
        raise ValueError(f"spatial_weight must have shape (1, 1, 1, {d}, 1, {d}, 1), got {tuple(spatial_weight.shape)}")
    weight = spatial_weight.to(device=key.device, dtype=key.dtype)
    outs_k, outs_v = [], []
    for grid in geometry.require_grids(d):
        a = geometry.text_len + grid.start
        shape = (grid.height // d, d, grid.width // d, d)
        for src, outs in ((key, outs_k), (value, outs_v)):
            blocks = src[:, :, a:a + grid.size].unflatten(2, shape)
            outs.append((blocks * weight).sum(dim=(3, 5)).flatten(2, 3))
    return torch.cat(outs_k, dim=2), torch.cat(outs_v, dim=2)


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError("query, key and value must be 4-D (batch, heads, tokens, head_dim)")
    if key.shape != value.shape or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"incompatible shapes q{tuple(query.shape)} k{tuple(key.shape)} v{tuple(value.shape)}")
