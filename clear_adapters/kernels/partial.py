"""CLEAR attention over part of a sequence, for multi-process inference (pure torch).

When the tokens of one joint sequence are spread over processes, each process attends its queries
against one block of keys at a time and the partial results are merged by log-sum-exp
(:func:`~clear_adapters.kernels.merge_partials`). Two pieces serve that:

* :func:`block_attention` -- CLEAR for given queries against one key block (ring attention). Text
  queries attend every key of the block; image queries, in square tiles, attend the block's text keys
  and only the image keys the tile's window can reach, so a key block outside every query's window costs
  its text part only -- it is skipped, not computed and masked -- and a near one only its reachable rows.
* :func:`full_attention_lse` / :func:`masked_attention_lse` -- softmax attention returning the
  log-sum-exp, through torch's fused kernels where they report it (CPU flash, CUDA memory-efficient),
  else the plain math (keys in chunks, so the score matrix stays bounded).

Rows that see no key get output 0 and log-sum-exp ``-inf``, which every log-sum-exp merge treats as
"nothing here".
"""

from __future__ import annotations

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import attend

#: keys per call in :func:`full_attention_lse` (bounds the float32 score matrix to queries x this)
KEY_CHUNK = 8192
#: image queries of :func:`block_attention` run in square tiles of this many rows and columns; each tile
#: gets the keys its own window reaches, so the work grows linearly with the block
QUERY_TILE = 32


def _clean(out: torch.Tensor, lse: torch.Tensor):
    """Zero the output of rows without any key (their softmax is 0/0) and keep lse = -inf there."""
    empty = torch.isneginf(lse)
    if bool(empty.any()):
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def _fused_lse(query, key, value, scale, bias=None):
    """(out, lse) from a fused kernel that reports the log-sum-exp (private aten ops), or None.

    ``bias``: an additive mask (0 / -inf) in the query's dtype. Rows it masks entirely come back
    with arbitrary values; callers fix them.
    """
    try:
        if query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                                  attn_mask=bias, scale=scale)[:2]
        elif query.device.type == "cuda":
            if bias is not None:
                bias = bias.expand(*query.shape[:2], *bias.shape[-2:])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0,
                                                                              False, scale=scale)[:2]
        else:
            return None
    except (RuntimeError, NotImplementedError):  # a shape or dtype the fused op does not take
        return None
    lse = lse[..., :query.shape[2]].float()  # the CUDA kernel pads the lse to a multiple of 32 rows
    return (out, lse) if lse.shape == query.shape[:3] and out.shape[:3] == query.shape[:3] else None


def full_attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       key_chunk: int = KEY_CHUNK):
    """Unmasked attention of (B, H, Nq, D) queries on (B, H, Nk, D) keys: (out, lse float32 (B, H, Nq)).

    A fused kernel with log-sum-exp when torch has one for the device, else the plain math in chunks of
    ``key_chunk`` keys merged exactly.
    """
    batch, heads, nq, dim = query.shape
    if key.shape[2] == 0:
        return (query.new_zeros(batch, heads, nq, value.shape[-1]),
                torch.full((batch, heads, nq), float("-inf"), device=query.device))
    if not (torch.is_grad_enabled() and query.requires_grad):
        fused = _fused_lse(query, key, value, scale)
        if fused is not None:
            return fused
    outs, lses = [], []
    for a in range(0, key.shape[2], key_chunk):
        o, l = attend(query, key[:, :, a:a + key_chunk], value[:, :, a:a + key_chunk], None, scale, True)
        outs.append(o)
        lses.append(l)
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(o.float() * torch.exp(l - lse)[..., None] for o, l in zip(outs, lses))
    return out.to(query.dtype), lse


def _query_tiles(queries: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> list[torch.Tensor]:
    """``queries`` (indices into rows/cols) grouped into square tiles of QUERY_TILE x QUERY_TILE tokens.

    A chunk's keys are its bounding box grown by the window, so square tiles waste far fewer key pairs
    than runs of whole rows (r = 16, 32 x 32 tiles: 62 x 62 keys per tile against 34 rows x width).
    """
    if not queries.numel():
        return []
    r, c = rows[queries], cols[queries]
    r, c = r - r.min(), c - c.min()
    tile = (r // QUERY_TILE) * (int(c.max()) // QUERY_TILE + 1) + c // QUERY_TILE
    order = torch.argsort(tile, stable=True)
    _, counts = torch.unique_consecutive(tile[order], return_counts=True)
    return list(queries[order].split(counts.tolist()))


def masked_attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                         scale: float):
    """Attention under a boolean (Nq, Nk) mask: (out, lse float32); rows without any key give 0 and -inf."""
    allowed = allowed.to(query.device)
    fused = None
    if not (torch.is_grad_enabled() and query.requires_grad):
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        fused = _fused_lse(query, key, value, scale, bias)
    out, lse = fused if fused is not None else attend(query, key, value, allowed, scale, True)
    empty = ~allowed.any(-1)
    if bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))
    return _clean(out, lse)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry,
                    config: ClearConfig, query_index: torch.Tensor, key_index: torch.Tensor, *, scale: float,
                    count_text_keys: bool = True):
    """CLEAR attention of some queries against one block of keys: ``(out, lse)``.

    Args:
        query, key, value: (B, H, Nq, D) and (B, H, Nk, D), tokens at canonical positions
            ``query_index`` / ``key_index`` of ``geometry`` (any order, any subset).
        config: the pattern; ``down_factor`` must be 1 (pooled keys need every image key at once).
        scale: logit scale of the whole sequence (``config.softmax_scale(D, geometry.total_len)``).
        count_text_keys: False when another block already holds these text keys (a process that
            holds a copy of the whole text); they are then left out here.

    Returns ``out`` (B, H, Nq, D) and ``lse`` (B, H, Nq) float32, ``-inf`` for queries that see no key.
    """
    if config.down_factor != 1:
        raise ValueError("block_attention needs down_factor 1: the pooled keys of d > 1 are computed from the "
                         "whole image and cannot be split into key blocks")
    text = geometry.text_len
    qi, ki = query_index.cpu(), key_index.cpu()
    batch, heads, nq, _ = query.shape
    out = query.new_zeros(batch, heads, nq, value.shape[-1])
    lse = torch.full((batch, heads, nq), float("-inf"), device=query.device)
    key_text = ki < text
    kept = torch.ones_like(key_text) if count_text_keys else ~key_text
    query_text = qi < text

    text_queries = torch.nonzero(query_text).flatten()
    kept_keys = torch.nonzero(kept).flatten()
    if text_queries.numel() and kept_keys.numel():
        # text queries attend every key: no mask, no geometry
        sel, keys = text_queries.to(query.device), kept_keys.to(key.device)
        o, l = full_attention_lse(query.index_select(2, sel), key.index_select(2, keys),
                                  value.index_select(2, keys), scale)
        out[:, :, sel], lse[:, :, sel] = o, l

    _, row, col = geometry.token_table()
    k_rows, k_cols = row[ki], col[ki]
    halo = config.halo
    for chunk in _query_tiles(torch.nonzero(~query_text).flatten(), row[qi], col[qi]):
        # the bounding box of these image queries, grown by the window: image keys outside it are skipped,
        # so a far block costs nothing here and a near one only the rows the window reaches
        q_pos = qi[chunk]
        q_rows, q_cols = row[q_pos], col[q_pos]
        reach = (k_rows >= q_rows.min() - halo) & (k_rows <= q_rows.max() + halo) \
            & (k_cols >= q_cols.min() - halo) & (k_cols <= q_cols.max() + halo)
        keys = torch.nonzero((key_text & kept) | (~key_text & reach)).flatten()
        if not keys.numel():
            continue
        sel, kdev = chunk.to(query.device), keys.to(key.device)
        o, l = masked_attention_lse(query.index_select(2, sel), key.index_select(2, kdev),
                                    value.index_select(2, kdev), geometry.allowed(config, q_pos, ki[keys]), scale)
        out[:, :, sel], lse[:, :, sel] = o, l
    return out, lse
