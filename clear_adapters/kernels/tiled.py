"""The tiled kernel: exact CLEAR attention with time and memory linear in the number of image tokens.

Image queries are cut into 2-D tiles; each tile attends the key rectangle its window can reach
(clamped inside the grid so all rectangles have one size) under a geometric mask: interior tiles
share one, border tiles have their own. CPU SDPA has a fused kernel only for 4-D inputs, so every
call is 4-D. Two ways to feed it:

* ``"strips"`` (CPU inference, the fast path). K and V under each column of tiles are copied into a
  contiguous strip as wide as the rectangles; inside a strip every tile's rectangle is a run of whole
  strip rows, so the tiles of a column are one overlapping strided *view*: no per-tile gather.
  Neighbouring strips of one kind (same sizes and masks: every column but the border ones) are cut by
  one copy into one buffer, head-major inside each strip, so that (strip, head) is one batch
  dimension and the tiles the second: one call per run of tiles (the interior run, and the runs
  clamped at the top and bottom border, which carry one mask per tile) serves all of them. A loaded
  machine punishes many short calls (each waits for every worker), so fewer, larger calls matter
  there most. The window part runs through the fused CPU kernel, which also returns the log-sum-exp;
  the text and pooled keys, which every image query attends, run as one unmasked call over all image
  queries; the parts are merged exactly by log-sum-exp. That LSE output has no autograd formula, hence:
* ``"gather"`` (any device, differentiable, caller masks). Each tile's rectangle, the text keys and
  the pooled keys are gathered into one key set and attended in a single masked call per class.

Text queries attend every text and image key with one plain SDPA call in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import attend, merge_masks, pooled_kv

#: gathered key elements (tiles x keys x heads x channels) per SDPA call in the gather path
CHUNK_ELEMENTS = 1 << 24

METHODS = ("auto", "strips", "gather")
#: output elements per call of the strips path's text/pooled-key part (bounds its extra memory)
GLOBAL_CHUNK_ELEMENTS = 1 << 22
#: elements of one K (or V) buffer of the strips path: neighbouring strips of one kind are cut by one
#: copy and run as one call per group while they fit (fewer, larger calls); one strip always runs
STRIP_BATCH_ELEMENTS = 1 << 23

# Cost model of the strips path, in units of one (query, key, head) pair of full attention. The fused
# CPU kernel splits a call's queries into blocks of 32 (64 from 192 queries on) and runs two small
# GEMMs per block and 512 keys: the more queries share a rectangle, the better those GEMMs run, but the
# larger the rectangle (the wasted pairs) grows. Pair cost relative to full attention by queries per
# tile, measured inside strips on the 2-core AMD EPYC of the CI (torch 2.13, fp32, head_dim 64):
_PAIR_COST = ((16, 2.1), (32, 1.44), (48, 1.44), (64, 1.33), (128, 1.25), (192, 1.12), (256, 1.1), (768, 1.02))
_STRIP_COPY_PAIRS = 40.0  # copying one K+V row into a strip, per head
# Python + dispatch overhead of one kernel call, per head. Counted per strip although neighbouring strips
# now share calls; re-measured with the shared calls, the choices hold (160x160, r=16: 4x8 best of six
# shapes; r=8 and r=32 at 128x128 within 7 % of the best measured shape).
_CALL_PAIRS = 20000.0
_TILE_SIDES = (2, 3, 4, 6, 8, 12, 16, 24, 32)


def _pair_cost(queries: int) -> float:
    points = _PAIR_COST
    if queries <= points[0][0]:
        return points[0][1] * points[0][0] / max(queries, 1)  # blocks mostly empty: cost per query grows
    for (q0, c0), (q1, c1) in zip(points, points[1:]):
        if queries <= q1:
            t = math.log(queries / q0) / math.log(q1 / q0)
            return c0 + t * (c1 - c0)
    return points[-1][1]


# ============================================================================ strips (CPU fast path)
@dataclass(frozen=True)
class _Group:
    """``n`` consecutive tiles of one strip, run as one call: their rectangles start ``key_step`` strip
    rows apart (``th`` inside the grid, 0 where they are clamped at its top or bottom border)."""

    y0: int  # first query row (grid-local)
    n: int
    rows: int  # query rows per tile (== tile height except in a last partial tile row)
    key_row0: int  # first strip row of the first tile's rectangle
    key_step: int
    signatures: tuple  # per tile: (rows, cols, dy, dx, rect_h, rect_w), which fixes its mask


@dataclass
class _Strip:
    """One column of query tiles of grid ``q_grid`` against the key strip cut from grid ``k_grid``."""

    q_grid: int
    k_grid: int
    x0: int  # first query column (grid-local)
    cols: int  # query columns
    key_col0: int  # first key column of the strip (grid-local in k_grid)
    rect_h: int
    rect_w: int
    groups: list

    def kind(self) -> tuple:
        """Strips of one kind, side by side, run together: same grids, sizes, groups and masks."""
        return (self.q_grid, self.k_grid, self.cols, self.rect_h, self.rect_w,
                tuple((g.y0, g.n, g.rows, g.key_row0, g.key_step, g.signatures) for g in self.groups))


@dataclass
class StripPlan:
    """Strips, groups and masks of one geometry, window and tile shape (cached per geometry)."""

    tile_shape: tuple[int, int]
    strips: list  # same-grid strips first: they cover every image query once
    runs: list  # (first strip, count): consecutive strips of one kind, one tile width apart
    masks: dict  # signature -> (allowed (Q, K) bool, rows without any key (Q,) bool)
    device_cache: dict

    @property
    def calls(self) -> int:
        """Kernel calls of the window part when every run fits in one batch."""
        return sum(len(self.strips[first].groups) for first, _ in self.runs)


def _window_mask(signature: tuple, r2: float) -> torch.Tensor:
    rows, cols, dy, dx, rect_h, rect_w = signature
    qy = torch.arange(rows).repeat_interleave(cols) + dy
    qx = torch.arange(cols).repeat(rows) + dx
    ky = torch.arange(rect_h).repeat_interleave(rect_w)
    kx = torch.arange(rect_w).repeat(rect_h)
    dist = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2
    return dist.to(torch.float64) < r2


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(v, hi))


def build_strip_plan(geometry: Geometry, config: ClearConfig, tile_shape: tuple[int, int] | None = None) -> StripPlan:
    """Strips and mask classes of the strips path for ``geometry`` (cached in ``geometry.cache``)."""
    tile_shape = tuple(tile_shape or choose_tile_shape(geometry, config, method="strips"))
    cache_key = ("tiled-strips", float(config.window_size), config.down_factor, tile_shape)
    if cache_key in geometry.cache:
        return geometry.cache[cache_key]
    grids = geometry.require_grids(config.down_factor)
    th, tw = tile_shape
    halo, r2 = config.halo, float(config.window_size) ** 2
    masks: dict = {}

    def mask_of(signature):
        if signature not in masks:
            allowed = _window_mask(signature, r2)
            masks[signature] = (allowed, ~allowed.any(1))
        return masks[signature]

    same, cross = [], []
    for qi, g in enumerate(grids):
        for ki, h in enumerate(grids):
            rect_h, rect_w = min(th + 2 * halo, h.height), min(tw + 2 * halo, h.width)
            for x0 in range(0, g.width, tw):
                cols = min(tw, g.width - x0)
                abs_x0 = g.col0 + x0
                key_col0 = _clamp(abs_x0 - halo - h.col0, 0, h.width - rect_w)
                dx = abs_x0 - (h.col0 + key_col0)
                groups: list[_Group] = []
                for y0 in range(0, g.height, th):
                    rows = min(th, g.height - y0)
                    abs_y0 = g.row0 + y0
                    key_row0 = _clamp(abs_y0 - halo - h.row0, 0, h.height - rect_h)
                    signature = (rows, cols, abs_y0 - (h.row0 + key_row0), dx, rect_h, rect_w)
                    if not bool(mask_of(signature)[0].any()):
                        continue  # a tile of another grid that reaches nothing in this one
                    # A run of tiles is one call when its rectangles advance by one step: th strip rows
                    # inside the grid, 0 where clamped at a border (there each tile has its own mask).
                    last = groups[-1] if groups else None
                    step = key_row0 - last.key_row0 - (last.n - 1) * last.key_step if last else -1
                    if last is not None and last.rows == rows and last.y0 + last.n * th == y0 and \
                            (step == last.key_step if last.n > 1 else step in (0, th)):
                        groups[-1] = _Group(last.y0, last.n + 1, rows, last.key_row0, step,
                                            last.signatures + (signature,))
                    else:
                        groups.append(_Group(y0, 1, rows, key_row0, th, (signature,)))
                if groups:
                    (same if qi == ki else cross).append(
                        _Strip(qi, ki, x0, cols, key_col0, rect_h, rect_w, groups))
    strips = same + cross
    runs: list[list[int]] = []
    for i, strip in enumerate(strips):
        if runs:
            first, count = runs[-1]
            prev = strips[first + count - 1]
            if strip.kind() == prev.kind() and strip.x0 == prev.x0 + prev.cols and \
                    strip.key_col0 == prev.key_col0 + prev.cols:
                runs[-1][1] += 1
                continue
        runs.append([i, 1])
    plan = StripPlan(tile_shape, strips, [tuple(r) for r in runs], masks, {})
    geometry.cache[cache_key] = plan
    return plan


def _strip_mask(plan: StripPlan, signatures: tuple, dtype: torch.dtype, device: torch.device):
    """Additive mask of a group and its rows without any key (None where nothing is masked / empty).

    One (Q, K) mask broadcast over the group's tiles when they share it (interior runs), else one
    per tile, (1, n, Q, K) (tiles are the kernel's second dimension): the fused kernel reads a
    per-tile mask as fast as a shared one. Cached per dtype and device.
    """
    key = (signatures, dtype, str(device))
    if key not in plan.device_cache:
        distinct = list(dict.fromkeys(signatures))
        allowed = torch.stack([plan.masks[sig][0] for sig in signatures]) if len(distinct) > 1 \
            else plan.masks[distinct[0]][0]
        empty = ~allowed.any(-1)
        additive = None if bool(allowed.all()) else \
            torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf")).to(device)
        if additive is not None and additive.ndim == 3:
            additive = additive.unsqueeze(0)  # (strips x heads: broadcast, tiles, Q, K)
        empty = empty.to(device) if bool(empty.any()) else None  # (tiles|.., Q) against lse (B, tiles, Q)
        plan.device_cache[key] = (additive, empty)
    return plan.device_cache[key]


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold an attention result over other keys into (out, lse), in place, exactly."""
    total = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - total).unsqueeze(-1).to(out.dtype))
    out.addcmul_(part_out, torch.exp(part_lse - total).unsqueeze(-1).to(out.dtype))
    lse.copy_(total)


class _StripCutter:
    """Copies the columns under a run of strips of one grid's Q, K or V into one contiguous buffer.

    The buffer is (strips, B*H, grid rows, strip columns, D): head-major inside a strip, so that
    (strip, head) is one kernel batch dimension with one stride and a tile's rectangle is a run of
    whole rows. One copy serves every strip of the run (the source is an overlapping strided view:
    neighbouring strips share columns), and the buffer is reused from one run to the next.
    """

    def __init__(self, tensor: torch.Tensor, text: int):
        self.tensor, self.text = tensor, text
        self.batch, self.heads, _, self.dim = tensor.shape
        # one buffer reused by every run: a fresh multi-MB allocation per run costs page faults
        self.buffer = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def cut(self, grid, col0: int, cols: int, strips: int, step: int) -> torch.Tensor:
        """Strips of ``cols`` columns from ``col0`` on, each ``step`` columns right of the previous."""
        t = self.tensor
        sb, sh, sn, sd = t.stride()
        source = t.as_strided((strips, self.batch, self.heads, grid.height, cols, self.dim),
                              (sn * step, sb, sh, sn * grid.width, sn, sd),
                              t.storage_offset() + sn * (self.text + grid.start + col0))
        size = source.numel()
        if self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=t.dtype, device=t.device)
        out = self.buffer[:size].view(strips, self.batch * self.heads, grid.height, cols, self.dim)
        out.view(source.shape).copy_(source)
        return out


def _tiles(buffer: torch.Tensor, tiles: int, first_row: int, row_step: int, rows: int) -> torch.Tensor:
    """(strips x heads, tiles, rows x columns, D) view of a strip buffer; tile ``i`` starts
    ``first_row + i * row_step`` rows down. Tiles overlap where their rectangles share rows (or, with
    ``row_step`` 0, are the same rows); the kernel only reads them."""
    n, bh, _, cols, dim = buffer.shape
    s_strip, s_head, s_row = buffer.stride()[:3]
    assert s_strip == bh * s_head, "strip buffers are contiguous"
    return buffer.as_strided((n * bh, tiles, rows * cols, dim), (s_head, row_step * s_row, dim, 1),
                             buffer.storage_offset() + first_row * s_row)


def _strips_per_batch(bh: int, dim: int, grids, plan: StripPlan) -> int:
    """Strips per batch: as many as keep one K (or V) buffer within :data:`STRIP_BATCH_ELEMENTS`."""
    widest = max((grids[s.k_grid].height * s.rect_w for s in plan.strips), default=1)
    return max(1, STRIP_BATCH_ELEMENTS // (bh * dim * widest))


def strips_supported(query: torch.Tensor, attention_mask=None, needs_grad: bool = False) -> bool:
    """Whether the strips path can run: CPU, no caller mask, no gradient needed, and a torch that has
    the fused CPU kernel returning log-sum-exp (a private op: fall back to the gather path without it)."""
    return query.device.type == "cpu" and attention_mask is None and not needs_grad and \
        hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _strips_attention(query, key, value, geometry: Geometry, config: ClearConfig, *, scale: float,
                      spatial_weight=None, return_lse: bool = False, tile_shape=None):
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    plan = build_strip_plan(geometry, config, tile_shape)
    grids = geometry.require_grids(config.down_factor)
    th = plan.tile_shape[0]
    batch, heads, _, dim = query.shape
    bh = batch * heads
    text, n_img = geometry.text_len, geometry.image_len
    # the fused kernel reads rows through strides but needs unit stride along channels
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    reduced = query.dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if reduced else query.dtype
    mask_dtype = torch.promote_types(query.dtype, torch.float32)

    out = torch.empty(text + n_img, batch, heads, dim, dtype=query.dtype)
    img_out = out[text:] if not reduced else torch.empty(n_img, batch, heads, dim, dtype=acc_dtype)
    img_lse = torch.empty(n_img, bh, dtype=torch.promote_types(acc_dtype, torch.float32))
    img_out_bh = img_out.view(n_img, bh, dim)
    q_cut, k_cut, v_cut = (_StripCutter(t, text) for t in (query, key, value))
    max_strips = _strips_per_batch(bh, dim, grids, plan)

    def out_view(t, g):
        return t[g.start:g.start + g.size].unflatten(0, (g.height, g.width))

    for first, count in plan.runs:
        for a in range(first, first + count, max_strips):
            n = min(max_strips, first + count - a)
            strip = plan.strips[a]
            g, h = grids[strip.q_grid], grids[strip.k_grid]
            q_buf = q_cut.cut(g, strip.x0, strip.cols, n, strip.cols)
            k_buf = k_cut.cut(h, strip.key_col0, strip.rect_w, n, strip.cols)
            v_buf = v_cut.cut(h, strip.key_col0, strip.rect_w, n, strip.cols)
            out_grid, lse_grid = out_view(img_out_bh, g), out_view(img_lse, g)
            cols = slice(strip.x0, strip.x0 + n * strip.cols)
            for grp in strip.groups:
                qv = _tiles(q_buf, grp.n, grp.y0, th, grp.rows)
                kv = _tiles(k_buf, grp.n, grp.key_row0, grp.key_step, strip.rect_h)
                vv = _tiles(v_buf, grp.n, grp.key_row0, grp.key_step, strip.rect_h)
                mask, empty = _strip_mask(plan, grp.signatures, mask_dtype, query.device)
                part, part_lse = flash(qv, kv, vv, 0.0, False, attn_mask=mask, scale=scale)
                if empty is not None:  # the kernel reports lse 0 for rows that saw no key
                    part_lse = part_lse.masked_fill(empty, float("-inf"))
                # (strips x heads, tiles, rows x cols, ...) -> (tiles, rows, strips, cols, heads, ...)
                part = part.unflatten(0, (n, bh)).unflatten(3, (grp.rows, strip.cols)).permute(2, 3, 0, 4, 1, 5)
                part_lse = part_lse.unflatten(0, (n, bh)).unflatten(3, (grp.rows, strip.cols)).permute(2, 3, 0, 4, 1)
                rows = slice(grp.y0, grp.y0 + grp.n * grp.rows)
                dest = out_grid[rows, cols].unflatten(0, (grp.n, grp.rows)).unflatten(2, (n, strip.cols))
                dest_lse = lse_grid[rows, cols].unflatten(0, (grp.n, grp.rows)).unflatten(2, (n, strip.cols))
                if strip.q_grid == strip.k_grid:  # same-grid strips come first and cover each query once
                    dest.copy_(part)
                    dest_lse.copy_(part_lse)
                else:
                    _merge_into(dest, dest_lse, part, part_lse)

    # text and pooled keys: every image query attends all of them, so no mask and one call
    global_k, global_v = key[:, :, :text], value[:, :, :text]
    if geometry.pooled_len(config.down_factor):
        pk, pv = pooled_kv(key, value, geometry, config.down_factor, spatial_weight)
        global_k, global_v = torch.cat([global_k, pk], dim=2), torch.cat([global_v, pv], dim=2)
    if global_k.shape[2]:
        # in slices of image queries, so the partial result never needs a second full-size buffer
        lse_bh = img_lse.view(n_img, batch, heads)
        step = max(1, GLOBAL_CHUNK_ELEMENTS // (bh * max(dim, global_k.shape[2])))
        for a in range(0, n_img, step):
            b = min(n_img, a + step)
            part, part_lse = flash(query[:, :, text + a:text + b], global_k, global_v, 0.0, False, scale=scale)
            _merge_into(img_out[a:b], lse_bh[a:b], part.permute(2, 0, 1, 3), part_lse.permute(2, 0, 1))
    if reduced:
        out[text:].copy_(img_out)
    lse = None
    if text:
        res = flash(query[:, :, :text], key[:, :, :text + n_img], value[:, :, :text + n_img], 0.0, False,
                    scale=scale)
        out[:text].copy_(res[0].permute(2, 0, 1, 3))
        if return_lse:
            lse = torch.cat([res[1].permute(2, 0, 1).to(img_lse.dtype), img_lse.view(n_img, batch, heads)])
    result = out.permute(1, 2, 0, 3)
    if not return_lse:
        return result
    lse = img_lse.view(n_img, batch, heads) if lse is None else lse
    return result, lse.permute(1, 2, 0).float()


# ============================================================================ gather (any device)
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


def choose_tile_shape(geometry: Geometry, config: ClearConfig, method: str = "gather") -> tuple[int, int]:
    """The tile shape (rows, cols) the cost model of ``method`` ranks cheapest for this geometry.

    Larger tiles run the fused kernel more efficiently but attend a larger rectangle per query; the
    strips path also pays for copying K/V strips (wider tiles need fewer copies) and per call.
    """
    key = ("tiled-shape", method, float(config.window_size), config.down_factor)
    if key in geometry.cache:
        return geometry.cache[key]
    grids = geometry.require_grids(config.down_factor)
    halo = config.halo
    extra = geometry.text_len + geometry.pooled_len(config.down_factor)
    max_h, max_w = max(g.height for g in grids), max(g.width for g in grids)
    best, best_cost = (1, 1), math.inf
    for th in _TILE_SIDES:
        for tw in _TILE_SIDES:
            th_, tw_ = min(th, max_h), min(tw, max_w)
            cost = 0.0
            for g in grids:
                rows = [(th_, g.height // th_)] + ([(g.height % th_, 1)] if g.height % th_ else [])
                cols = [(tw_, g.width // tw_)] + ([(g.width % tw_, 1)] if g.width % tw_ else [])
                for h in grids:
                    rect_h, rect_w = min(th_ + 2 * halo, h.height), min(tw_ + 2 * halo, h.width)
                    for vh, ny in rows:
                        for vw, nx in cols:
                            q = vh * vw
                            if method == "strips":
                                cost += ny * nx * q * rect_h * rect_w * _pair_cost(q)
                            else:  # gathered tiles are padded to full size and carry the text keys
                                cost += ny * nx * (th_ * tw_ + 48) * (rect_h * rect_w + extra / len(grids))
                    if method == "strips":
                        strips = math.ceil(g.width / tw_)
                        cost += strips * h.height * rect_w * _STRIP_COPY_PAIRS
                        cost += strips * min(3, math.ceil(g.height / th_)) * _CALL_PAIRS
            if cost < best_cost:
                best, best_cost = (th_, tw_), cost
    geometry.cache[key] = best
    return best


def build_plan(geometry: Geometry, config: ClearConfig, tile_shape: tuple[int, int] | None = None) -> TilePlan:
    """Gather indices and mask classes of the gather path for ``geometry`` (cached in ``geometry.cache``)."""
    tile_shape = tuple(tile_shape or choose_tile_shape(geometry, config, method="gather"))
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
                    tile_shape: tuple[int, int] | None = None, method: str = "auto"):
    """CLEAR attention over the full canonical sequence, (B, H, T + N, D) in and out.

    ``method="auto"`` takes the strips path on CPU when no gradient and no caller mask is involved,
    the gather path otherwise (see the module docstring); both are exact. The result may be a
    non-contiguous view (token-major memory), as SDPA's own output is.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if geometry.image_len == 0:  # text only: plain attention, nothing to tile
        return attend(query, key, value, attention_mask, scale, return_lse)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, spatial_weight))
    if method == "auto":
        method = "strips" if strips_supported(query, attention_mask, needs_grad) else "gather"
    if method == "strips":
        if not strips_supported(query, attention_mask, needs_grad):
            raise ValueError("the strips path needs CPU tensors, no attention_mask and no gradient; "
                             "use method='gather'")
        return _strips_attention(query, key, value, geometry, config, scale=scale, spatial_weight=spatial_weight,
                                 return_lse=return_lse, tile_shape=tile_shape)
    return _gather_attention(query, key, value, geometry, config, scale=scale, spatial_weight=spatial_weight,
                             attention_mask=attention_mask, return_lse=return_lse, tile_shape=tile_shape)


def _gather_attention(query, key, value, geometry: Geometry, config: ClearConfig, *, scale: float,
                      spatial_weight=None, attention_mask=None, return_lse: bool = False, tile_shape=None):
    plan = build_plan(geometry, config, tile_shape)
    batch, heads, _, dim = query.shape
    text, n_img = geometry.text_len, geometry.image_len
    device = query.device
    if geometry.pooled_len(config.down_factor):
        pk, pv = pooled_kv(key, value, geometry, config.down_factor, spatial_weight)
        key_all, value_all = torch.cat([key, pk], dim=2), torch.cat([value, pv], dim=2)
    else:
        key_all, value_all = key, value

    # token-major (B, N, H, D), made contiguous once: index_select on a strided view would copy the
    # whole tensor again on every call
    q_tok = query.transpose(1, 2).contiguous()
    k_tok, v_tok = key_all.transpose(1, 2).contiguous(), value_all.transpose(1, 2).contiguous()

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
