"""The tiled kernel: exact CLEAR attention with time and memory linear in the number of image tokens.

Image queries are cut into 2-D tiles. For each tile the kernel gathers the key rectangle its window
can reach in every grid (clamped inside the grid so all rectangles have one size), the text keys and
the pooled keys, and runs batched 4-D SDPA (the layout CPU SDPA has a fused kernel for). Tiles whose
queries sit at the same offsets inside their rectangles share one geometric mask: interior tiles form
one class, the tiles along the borders a few more. One SDPA call per class broadcasts that mask over
tiles and heads instead of materialising a mask per tile. Text queries attend every text and image
key with one plain SDPA call. Works on any device and is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import attend, merge_masks, pooled_kv

#: gathered key elements (tiles x keys x heads x channels) per SDPA call; bounds the working memory
CHUNK_ELEMENTS = 1 << 24


@dataclass
class _TileClass:
    tiles: torch.Tensor  # (n,) tile numbers in this class
    mask: torch.Tensor  # (Q, K) bool, shared by every tile of the class


@dataclass
class TilePlan:
    """Gather indices for one geometry, window and tile shape (built on CPU, cached per geometry)."""

    tile_shape: tuple[int, int]
    query_index: torch.Tensor  # (tiles, Q) canonical positions (padded tiles repeat their last token)
    key_index: torch.Tensor  # (tiles, K) positions in [text, image, pooled]
    classes: list[_TileClass]
    inverse: torch.Tensor  # (N_img,) slot of each image token in the class-ordered (tiles x Q) output
    device_cache: dict

    @property
    def keys_per_query(self) -> int:
        return int(self.key_index.shape[1])


def choose_tile_shape(geometry: Geometry, config: ClearConfig) -> tuple[int, int]:
    """A tile shape that keeps the gathered rectangle small relative to the window.

    Cost model (measured on CPU SDPA): per tile, ``Q * K`` multiply-adds plus a fixed overhead of
    about 2 K-sized rows; small tiles waste little of the rectangle, large ones amortise overhead.
    """
    grids = geometry.require_grids(config.down_factor)
    halo = config.halo
    extra = geometry.text_len + geometry.pooled_len(config.down_factor)
    best, best_cost = (1, 1), math.inf
    max_h = max(g.height for g in grids)
    max_w = max(g.width for g in grids)
    for th in (4, 8, 12, 16, 24, 32, 48, 64):
        for tw in (4, 8, 12, 16, 24, 32, 48, 64):
            th_, tw_ = min(th, max_h), min(tw, max_w)
            cost = 0.0
            for g in grids:
                tiles = math.ceil(g.height / th_) * math.ceil(g.width / tw_)
                keys = extra + sum(min(th_ + 2 * halo, h.height) * min(tw_ + 2 * halo, h.width) for h in grids)
                cost += tiles * (th_ * tw_ + 48) * keys
            if cost < best_cost:
                best, best_cost = (th_, tw_), cost
    return best


def build_plan(geometry: Geometry, config: ClearConfig, tile_shape: tuple[int, int] | None = None) -> TilePlan:
    """Gather indices and mask classes for ``geometry`` (cached in ``geometry.cache``)."""
    tile_shape = tile_shape or choose_tile_shape(geometry, config)
    cache_key = ("tiled", float(config.window_size), config.down_factor, tile_shape)
    if cache_key in geometry.cache:
        return geometry.cache[cache_key]
    grids = geometry.require_grids(config.down_factor)
    th, tw = tile_shape
    halo, text, n_img = config.halo, geometry.text_len, geometry.image_len
    pooled = geometry.pooled_len(config.down_factor)
    r2 = float(config.window_size) ** 2

    q_rows, k_parts, signatures, q_coords = [], [], [], []
    for g in grids:
        for y0 in range(0, g.height, th):
            for x0 in range(0, g.width, tw):
                vh, vw = min(th, g.height - y0), min(tw, g.width - x0)
                ly = torch.arange(th).clamp(max=vh - 1)
                lx = torch.arange(tw).clamp(max=vw - 1)
                qy, qx = (y0 + ly)[:, None].expand(th, tw), (x0 + lx)[None, :].expand(th, tw)
                q_rows.append((text + g.start + qy * g.width + qx).flatten())
                abs_y0, abs_x0 = g.row0 + y0, g.col0 + x0
                q_coords.append(((g.row0 + qy).flatten() - abs_y0, (g.col0 + qx).flatten() - abs_x0))
                parts, sig = [], [vh, vw]
                for h in grids:
                    rh, rw = min(th + 2 * halo, h.height), min(tw + 2 * halo, h.width)
                    sy = min(max(abs_y0 - halo - h.row0, 0), h.height - rh)
                    sx = min(max(abs_x0 - halo - h.col0, 0), h.width - rw)
                    ry, rx = torch.arange(sy, sy + rh), torch.arange(sx, sx + rw)
                    parts.append((text + h.start + ry[:, None] * h.width + rx[None, :]).flatten())
                    # coordinates of the rectangle relative to the tile's first query
                    sig += [h.row0 + sy - abs_y0, h.col0 + sx - abs_x0, rh, rw]
                k_parts.append(parts)
                signatures.append(tuple(sig))

    text_idx = torch.arange(text)
    pooled_idx = torch.arange(text + n_img, text + n_img + pooled)
    key_index = torch.stack([torch.cat([text_idx, *parts, pooled_idx]) for parts in k_parts])
    query_index = torch.stack(q_rows)

    groups: dict[tuple, list[int]] = {}
    for t, sig in enumerate(signatures):
        groups.setdefault(sig, []).append(t)
    classes = []
    for sig, members in groups.items():
        qy, qx = q_coords[members[0]]
        cols_y, cols_x = [], []
        for i in range(len(grids)):
            oy, ox, rh, rw = sig[2 + 4 * i: 6 + 4 * i]
            ky, kx = torch.meshgrid(oy + torch.arange(rh), ox + torch.arange(rw), indexing="ij")
            cols_y.append(ky.flatten())
            cols_x.append(kx.flatten())
        ky, kx = torch.cat(cols_y), torch.cat(cols_x)
        dist = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2
        window = dist.to(torch.float64) < r2
        q = window.shape[0]
        mask = torch.cat([torch.ones(q, text, dtype=torch.bool), window,
                          torch.ones(q, pooled, dtype=torch.bool)], dim=1)
        classes.append(_TileClass(torch.tensor(members), mask))

    # where each image token's output lands once the classes have run, in class order
    order = torch.cat([c.tiles for c in classes])
    slot_of = torch.full((n_img,), -1, dtype=torch.int64)
    flat = query_index[order].flatten() - text
    slots = torch.arange(flat.numel())
    # first occurrence wins; padded duplicates come after the real token in each tile
    rev = torch.arange(flat.numel() - 1, -1, -1)
    slot_of[flat[rev]] = slots[rev]
    assert bool((slot_of >= 0).all()), "tile plan does not cover every image token"
    plan = TilePlan(tile_shape, query_index, key_index, classes, slot_of, {})
    geometry.cache[cache_key] = plan
    return plan


def _on(plan: TilePlan, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    if key not in plan.device_cache:
        plan.device_cache[key] = tensor.to(device)
    return plan.device_cache[key]


def tiled_attention(query, key, value, geometry: Geometry, config: ClearConfig, *, scale: float,
                    spatial_weight=None, attention_mask=None, return_lse: bool = False,
                    tile_shape: tuple[int, int] | None = None):
    """CLEAR attention over the full canonical sequence, (B, H, T + N, D) in and out."""
    plan = build_plan(geometry, config, tile_shape)
    batch, heads, _, dim = query.shape
    text, n_img = geometry.text_len, geometry.image_len
    device = query.device
    if geometry.pooled_len(config.down_factor):
        pk, pv = pooled_kv(key, value, geometry, config.down_factor, spatial_weight)
        key_all, value_all = torch.cat([key, pk], dim=2), torch.cat([value, pv], dim=2)
    else:
        key_all, value_all = key, value

    # token-major (B, N, H, D): a gather along tokens then copies whole H x D rows
    q_tok = query.transpose(1, 2)
    k_tok, v_tok = key_all.transpose(1, 2), value_all.transpose(1, 2)

    outs, lses = [], []
    if text:
        extra = None if attention_mask is None else attention_mask[..., :text, :text + n_img] \
            if attention_mask.shape[-2] != 1 else attention_mask[..., :text + n_img]
        res = attend(query[:, :, :text], key[:, :, :text + n_img], value[:, :, :text + n_img], extra, scale,
                     return_lse)
        text_out, text_lse = (res if return_lse else (res, None))

    q_len, k_len = plan.query_index.shape[1], plan.key_index.shape[1]
    per_tile = max(1, k_len * heads * dim * batch)
    chunk = max(1, CHUNK_ELEMENTS // per_tile)
    qidx_dev = _on(plan, "q", plan.query_index, device)
    kidx_dev = _on(plan, "k", plan.key_index, device)
    for ci, cls in enumerate(plan.classes):
        mask = _on(plan, f"mask{ci}", cls.mask, device)
        tiles = _on(plan, f"tiles{ci}", cls.tiles, device)
        for a in range(0, tiles.numel(), chunk):
            sel = tiles[a:a + chunk]
            nt = sel.numel()
            qi, ki = qidx_dev[sel], kidx_dev[sel]
            qt = q_tok.index_select(1, qi.flatten()).view(batch * nt, q_len, heads, dim).transpose(1, 2)
            kt = k_tok.index_select(1, ki.flatten()).view(batch * nt, k_len, heads, dim).transpose(1, 2)
            vt = v_tok.index_select(1, ki.flatten()).view(batch * nt, k_len, heads, dim).transpose(1, 2)
            tile_mask = mask
            if attention_mask is not None:
                tile_mask = merge_masks(mask, _gather_extra(attention_mask, qi, ki, geometry.pooled_len(
                    config.down_factor), batch, text + n_img))
            res = attend(qt, kt, vt, tile_mask, scale, return_lse)
            out, lse = (res if return_lse else (res, None))
            outs.append(out.transpose(1, 2).reshape(batch, nt * q_len, heads, dim))
            if return_lse:
                lses.append(lse.view(batch, nt, heads, q_len).transpose(1, 2).reshape(batch, heads, nt * q_len))
    inverse = _on(plan, "inverse", plan.inverse, device)
    img_out = torch.cat(outs, dim=1).index_select(1, inverse).transpose(1, 2)
    if text:
        img_out = torch.cat([text_out, img_out], dim=2)
    if not return_lse:
        return img_out
    img_lse = torch.cat(lses, dim=2).index_select(2, inverse)
    return img_out, (torch.cat([text_lse, img_lse], dim=2) if text else img_lse)


def _gather_extra(extra: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, pooled: int, batch: int,
                  seq: int) -> torch.Tensor:
    """The caller's mask entries for each tile's (query, key) pairs: (B * tiles, H|1, Q, K)."""
    nt, q_len = qi.shape
    k_len = ki.shape[1]
    if pooled:  # pooled keys are never masked by the caller
        fill = torch.ones if extra.dtype == torch.bool else torch.zeros
        extra = torch.cat([extra, fill((*extra.shape[:-1], pooled), dtype=extra.dtype, device=extra.device)], -1)
    extra = extra.expand(batch, extra.shape[1], extra.shape[2], extra.shape[3])
    rows = extra if extra.shape[2] == 1 else extra[:, :, qi.flatten()]  # (B, h, nt*Q|1, Nk)
    if rows.shape[2] == 1:
        rows = rows.expand(-1, -1, nt * q_len, -1)
    rows = rows.view(batch, rows.shape[1], nt, q_len, -1)
    gathered = torch.gather(rows, 4, ki.view(1, 1, nt, 1, k_len).expand(batch, rows.shape[1], nt, q_len, k_len))
    return gathered.permute(0, 2, 1, 3, 4).reshape(batch * nt, rows.shape[1], q_len, k_len)
