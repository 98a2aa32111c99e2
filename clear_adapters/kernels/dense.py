"""The reference kernel: SDPA with the full CLEAR mask. Exact and simple; quadratic in tokens."""

from __future__ import annotations

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import attend, merge_masks, pad_extra_mask, pooled_kv

#: queries per chunk when the caller bounds memory; the mask is built one chunk at a time
DEFAULT_CHUNK = 2048


def dense_attention(query, key, value, geometry: Geometry, config: ClearConfig, *, scale: float,
                    spatial_weight=None, attention_mask=None, query_index=None, key_index=None,
                    return_lse: bool = False, chunk_size: int | None = None):
    """CLEAR attention by masked SDPA over all keys.

    ``query``/``key``/``value`` are (B, H, N, D) in the token order given by ``query_index`` /
    ``key_index`` (positions in the canonical sequence; None = canonical). ``attention_mask`` is the
    caller's (B|1, H|1, Nq, Nk) mask over those keys. With ``chunk_size`` the queries are processed
    in chunks so the mask never exceeds ``chunk_size x Nk``.
    """
    pooled = geometry.pooled_len(config.down_factor)
    if pooled:
        if key_index is not None:
            raise ValueError("down_factor > 1 needs the full key sequence (pooled keys are computed from it)")
        pk, pv = pooled_kv(key, value, geometry, config.down_factor, spatial_weight)
        key, value = torch.cat([key, pk], dim=2), torch.cat([value, pv], dim=2)
        attention_mask = pad_extra_mask(attention_mask, pooled)
    nq = query.shape[2]
    chunk = nq if chunk_size is None else max(1, chunk_size)
    qpos = torch.arange(geometry.total_len) if query_index is None else query_index.cpu()
    outs, lses = [], []
    for a in range(0, nq, chunk):
        pattern = geometry.allowed(config, qpos[a:a + chunk], key_index).to(query.device)
        extra = None if attention_mask is None else attention_mask[..., a:a + chunk, :] \
            if attention_mask.shape[-2] != 1 else attention_mask
        result = attend(query[:, :, a:a + chunk], key, value, merge_masks(pattern, extra), scale, return_lse)
        if return_lse:
            outs.append(result[0])
            lses.append(result[1])
        else:
            outs.append(result)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    if return_lse:
        return out, (torch.cat(lses, dim=-1) if len(lses) > 1 else lses[0])
    return out
