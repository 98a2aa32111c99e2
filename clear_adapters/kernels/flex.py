"""The flex kernel: torch FlexAttention with a BlockMask derived from the geometry (GPU default).

Token order decides speed. In the upstream row-major order a 128-token block covers a thin strip of
image rows, so most blocks that touch a window are only partly inside it and the kernel computes far
more than the window needs. In ``order="tile"`` the image tokens of each grid are permuted into 2-D
tiles of exactly one block each (edge tiles padded with dummy tokens that nothing attends), so most
blocks are either fully inside the window or fully outside it. The permutation is undone on output.

The BlockMask is built directly at block level — bounding boxes classify most block pairs as empty or
full, the uncertain ones are settled exactly on row segments — so no N x N mask is ever materialised
(256x256 tokens take milliseconds). The layout, its device-side gather indices and the BlockMask are
cached per (geometry, window, down factor, order, block size, device).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..config import ClearConfig
from ..geometry import Geometry
from .common import pooled_kv

TEXT, IMAGE, POOLED, DUMMY = 0, 1, 2, -1
DEFAULT_BLOCK = 128


def tile_shape_for_block(block: int) -> tuple[int, int]:
    """The 2-D tile (rows, cols) holding ``block`` tokens, as square as possible, wider than tall."""
    th = 2 ** (int(math.log2(block)) // 2)
    while block % th:
        th //= 2
    return th, block // th


@dataclass
class FlexLayout:
    """The flex token order: ``slot_token[s]`` is the canonical key position at slot ``s`` (-1: dummy)."""

    order: str
    block: int
    slot_token: torch.Tensor  # (L,) int64, positions in [text, image, pooled]
    kind: torch.Tensor  # (L,) int64
    row: torch.Tensor
    col: torch.Tensor
    q_len: int  # slots that hold queries (text + image + their dummies): pooled slots come last
    inverse: torch.Tensor  # (T + N,) slot of each canonical query token
    device_cache: dict = field(default_factory=dict, repr=False)

    def gather_indices(self, device, q_slots: int, n_tokens: int):
        """(query slots, key slots, inverse) on ``device``: canonical -> flex order and back."""
        key = (str(device), q_slots, n_tokens)
        if key not in self.device_cache:
            slots = self.slot_token.clamp(min=0)
            # dummy and pooled query slots read the last token; their rows are dropped on output
            self.device_cache[key] = (slots[:q_slots].clamp(max=n_tokens - 1).to(device), slots.to(device),
                                      self.inverse.to(device))
        return self.device_cache[key]


def build_layout(geometry: Geometry, config: ClearConfig, order: str = "tile",
                 block: int = DEFAULT_BLOCK) -> FlexLayout:
    """Slot order for ``order`` in {"row", "tile"}; cached per geometry."""
    if order not in ("row", "tile"):
        raise ValueError(f"order must be 'row' or 'tile', got {order!r}")
    key = ("flex-layout", order, block, config.down_factor)
    if key in geometry.cache:
        return geometry.cache[key]
    text, n_img = geometry.text_len, geometry.image_len
    pooled = geometry.pooled_len(config.down_factor)
    is_image, rows, cols = geometry.token_table()
    if order == "row":
        slots = torch.arange(text + n_img)
    else:
        # image tiles first so every tile starts on a block boundary; then the text tokens
        th, tw = tile_shape_for_block(block)
        parts = []
        for g in geometry.require_grids(config.down_factor):
            ph, pw = math.ceil(g.height / th) * th, math.ceil(g.width / tw) * tw
            y = torch.arange(ph)[:, None].expand(ph, pw)
            x = torch.arange(pw)[None, :].expand(ph, pw)
            tok = torch.where((y < g.height) & (x < g.width), text + g.start + y * g.width + x,
                              torch.full_like(y, -1))
            # (ph/th, th, pw/tw, tw) -> tiles row-major, tokens row-major inside each tile
            parts.append(tok.reshape(ph // th, th, pw // tw, tw).permute(0, 2, 1, 3).reshape(-1))
        slots = torch.cat([*parts, torch.arange(text)])
    q_len = slots.numel()
    slots = torch.cat([slots, torch.arange(text + n_img, text + n_img + pooled)])
    pad = (-slots.numel()) % block
    slots = torch.cat([slots, torch.full((pad,), -1, dtype=torch.int64)])
    valid = slots >= 0
    safe = slots.clamp(min=0).clamp(max=max(text + n_img - 1, 0))
    kind = torch.where(slots >= text + n_img, POOLED, torch.where(is_image[safe], IMAGE, TEXT))
    kind = torch.where(valid, kind, DUMMY)
    row = torch.where(kind == IMAGE, rows[safe], 0)
    col = torch.where(kind == IMAGE, cols[safe], 0)
    inverse = torch.empty(text + n_img, dtype=torch.int64)
    q_slots = torch.nonzero((kind == TEXT) | (kind == IMAGE)).flatten()
    inverse[slots[q_slots]] = q_slots
    layout = FlexLayout(order, block, slots, kind, row, col, q_len, inverse)
    geometry.cache[key] = layout
    return layout


def _allowed(qk, qr, qc, kk, kr, kc, r2: float):
    """The CLEAR rule on token tables (broadcasting); shared by the block classifier and mask_mod."""
    window = ((qr - kr) ** 2 + (qc - kc) ** 2) < r2
    text_q = (qk == TEXT) & ((kk == TEXT) | (kk == IMAGE))
    image_q = (qk == IMAGE) & ((kk == TEXT) | (kk == POOLED) | ((kk == IMAGE) & window))
    return text_q | image_q


def block_structure(layout: FlexLayout, config: ClearConfig, q_len: int | None = None):
    """Block-level (partial, full) boolean matrices (nq_blocks, nkv_blocks), exact, without an N x N mask."""
    blk = layout.block
    q_len = layout.q_len if q_len is None else q_len
    nq, nk = math.ceil(q_len / blk), layout.kind.numel() // blk
    r2 = float(config.window_size) ** 2

    def blocks(t, n):
        return t[:n * blk].view(n, blk) if t.numel() >= n * blk else \
            torch.cat([t, torch.full((n * blk - t.numel(),), DUMMY, dtype=t.dtype)]).view(n, blk)

    kind_q, kind_k = blocks(layout.kind, nq), blocks(layout.kind, nk)
    row_q, row_k = blocks(layout.row, nq), blocks(layout.row, nk)
    col_q, col_k = blocks(layout.col, nq), blocks(layout.col, nk)

    def summary(kind, row, col):
        img = kind == IMAGE
        big = torch.iinfo(torch.int64).max // 4
        rmin = torch.where(img, row, big).amin(1)
        rmax = torch.where(img, row, -big).amax(1)
        cmin = torch.where(img, col, big).amin(1)
        cmax = torch.where(img, col, -big).amax(1)
        has = {k: (kind == k).any(1) for k in (TEXT, IMAGE, POOLED, DUMMY)}
        return has, rmin.float(), rmax.float(), cmin.float(), cmax.float()

    hq, qrmin, qrmax, qcmin, qcmax = summary(kind_q, row_q, col_q)
    hk, krmin, krmax, kcmin, kcmax = summary(kind_k, row_k, col_k)
    gap_r = (torch.maximum(krmin[None] - qrmax[:, None], qrmin[:, None] - krmax[None])).clamp(min=0)
    gap_c = (torch.maximum(kcmin[None] - qcmax[:, None], qcmin[:, None] - kcmax[None])).clamp(min=0)
    far_r = torch.maximum((qrmax[:, None] - krmin[None]).abs(), (krmax[None] - qrmin[:, None]).abs())
    far_c = torch.maximum((qcmax[:, None] - kcmin[None]).abs(), (kcmax[None] - qcmin[:, None]).abs())
    img_pair = hq[IMAGE][:, None] & hk[IMAGE][None]
    some_window = img_pair & (gap_r ** 2 + gap_c ** 2 < r2)
    all_window = far_r ** 2 + far_c ** 2 < r2
    maybe = (hq[TEXT][:, None] & (hk[TEXT] | hk[IMAGE])[None]) | \
            (hq[IMAGE][:, None] & (hk[TEXT] | hk[POOLED])[None]) | some_window
    q_text_only = ~(hq[DUMMY] | hq[IMAGE] | hq[POOLED])
    q_image_only = ~(hq[DUMMY] | hq[TEXT] | hq[POOLED])
    full_text = q_text_only[:, None] & ~(hk[DUMMY] | hk[POOLED])[None]
    full_image = q_image_only[:, None] & ~hk[DUMMY][None] & (~hk[IMAGE][None] | all_window)
    surely_full = (full_text | full_image) & maybe
    # Exact check of the uncertain pairs. Pairs of image-only blocks (the bulk) are decided on row
    # segments: the nearest and farthest points of two runs of one row each are known in closed form.
    # Blocks mixing kinds (a few at the text/pooled boundaries) are checked token by token.
    uncertain = torch.nonzero(maybe & ~surely_full)
    partial = torch.zeros(nq, nk, dtype=torch.bool)
    full = surely_full.clone()
    pure_q, pure_k = ~(hq[TEXT] | hq[POOLED]), ~(hk[TEXT] | hk[POOLED])
    by_segments = pure_q[uncertain[:, 0]] & pure_k[uncertain[:, 1]]
    seg_q, seg_k = _segments(kind_q, row_q, col_q), _segments(kind_k, row_k, col_k)
    pairs = uncertain[by_segments]
    step = max(1, (1 << 22) // (seg_q[0].shape[1] * seg_k[0].shape[1]))
    for chunk in pairs.split(step):
        i, j = chunk[:, 0], chunk[:, 1]
        anyv, allv = _segment_pairs(seg_q, seg_k, i, j, r2)
        allv &= ~hq[DUMMY][i] & ~hk[DUMMY][j]
        partial[i[anyv & ~allv], j[anyv & ~allv]] = True
        full[i[allv], j[allv]] = True
    for chunk in uncertain[~by_segments].split(256):
        i, j = chunk[:, 0], chunk[:, 1]
        m = _allowed(kind_q[i][:, :, None], row_q[i][:, :, None], col_q[i][:, :, None],
                     kind_k[j][:, None, :], row_k[j][:, None, :], col_k[j][:, None, :], r2)
        anyv, allv = m.flatten(1).any(1), m.flatten(1).all(1)
        partial[i[anyv & ~allv], j[anyv & ~allv]] = True
        full[i[allv], j[allv]] = True
    return partial, full


def _segments(kind: torch.Tensor, row: torch.Tensor, col: torch.Tensor):
    """Runs of consecutive image tokens on one row, per block: (row, first col, last col, valid), (n, S)."""
    img = kind == IMAGE
    prev_img = torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], 1)
    cont = prev_img & (row == torch.roll(row, 1, 1)) & (col == torch.roll(col, 1, 1) + 1)
    start = img & ~cont
    seg = torch.cumsum(start.long(), 1) - 1  # segment number of each token within its block
    n, width = kind.shape[0], max(1, int(start.sum(1).max()) if start.numel() else 1)
    seg = torch.where(img, seg, width)  # non-image tokens go to a spare column, dropped below
    big = torch.iinfo(torch.int64).max // 4
    first = torch.full((n, width + 1), big).scatter_reduce(1, seg, torch.where(img, col, big), "amin")
    last = torch.full((n, width + 1), -big).scatter_reduce(1, seg, torch.where(img, col, -big), "amax")
    rows = torch.zeros((n, width + 1), dtype=row.dtype).scatter(1, seg, torch.where(img, row, 0))
    valid = torch.zeros((n, width + 1), dtype=torch.bool).scatter(1, seg, img)
    return rows[:, :width], first[:, :width], last[:, :width], valid[:, :width]


def _segment_pairs(seg_q, seg_k, i: torch.Tensor, j: torch.Tensor, r2: float):
    """(any allowed, all allowed) between the image segments of query blocks ``i`` and key blocks ``j``."""
    qr, qlo, qhi, qv = (t[i][:, :, None] for t in seg_q)
    kr, klo, khi, kv = (t[j][:, None, :] for t in seg_k)
    dr2 = (qr - kr) ** 2
    near = torch.maximum(torch.maximum(klo - qhi, qlo - khi), torch.zeros_like(qlo))
    far = torch.maximum((qhi - klo).abs(), (khi - qlo).abs())
    valid = qv & kv
    anyv = (valid & ((dr2 + near ** 2).double() < r2)).flatten(1).any(1)
    allv = (~valid | ((dr2 + far ** 2).double() < r2)).flatten(1).all(1)
    return anyv, allv & valid.flatten(1).any(1)


def _ordered(dense: torch.Tensor):
    num = dense.sum(-1).to(torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def build_block_mask(geometry: Geometry, config: ClearConfig, device, order: str = "tile",
                     block: int = DEFAULT_BLOCK):
    """(layout, BlockMask) for this geometry; cached per device."""
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex-mask", float(config.window_size), config.down_factor, order, block, str(device))
    if key in geometry.cache:
        return geometry.cache[key]
    layout = build_layout(geometry, config, order, block)
    partial, full = block_structure(layout, config)
    kind, row, col = (t.to(device) for t in (layout.kind, layout.row, layout.col))
    r2 = float(config.window_size) ** 2

    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(kind[q_idx], row[q_idx], col[q_idx], kind[kv_idx], row[kv_idx], col[kv_idx], r2)

    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    q_slots = partial.shape[0] * block
    mask = BlockMask.from_kv_blocks(kv_num.to(device), kv_idx.to(device), full_num.to(device),
                                    full_idx.to(device), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_slots, layout.kind.numel()))
    geometry.cache[key] = (layout, mask)
    return layout, mask


def block_efficiency(geometry: Geometry, config: ClearConfig, order: str = "tile",
                     block: int = DEFAULT_BLOCK) -> dict:
    """True allowed entries / entries inside the blocks the flex kernel computes (CPU, no attention run).

    The blocks are counted on the very BlockMask :func:`flex_attention_clear` runs with (partial blocks,
    which evaluate the mask_mod, plus full ones); the true entries come from the geometry.
    """
    _, mask = build_block_mask(geometry, config, "cpu", order, block)
    partial, full = int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum())
    computed = partial + full
    t, n = geometry.text_len, geometry.image_len
    true = t * (t + n) + n * t + geometry.window_pair_count(config.window_size) + \
        n * geometry.pooled_len(config.down_factor)
    return {"order": order, "block": block, "computed_blocks": computed, "partial_blocks": partial,
            "full_blocks": full, "true_entries": true,
            "efficiency": true / (computed * block * block) if computed else 0.0}


def flex_attention_clear(query, key, value, geometry: Geometry, config: ClearConfig, *, scale: float,
                         spatial_weight=None, return_lse: bool = False, order: str = "tile",
                         block: int = DEFAULT_BLOCK, compiled: bool | None = None):
    """CLEAR attention with FlexAttention over the full canonical sequence, (B, H, T + N, D)."""
    layout, mask = build_block_mask(geometry, config, query.device, order, block)
    if geometry.pooled_len(config.down_factor):
        pk, pv = pooled_kv(key, value, geometry, config.down_factor, spatial_weight)
        key, value = torch.cat([key, pk], dim=2), torch.cat([value, pv], dim=2)
    q_index, kv_index, inverse = layout.gather_indices(query.device, mask.seq_lengths[0], query.shape[2])
    # dummy key slots read a real token but no mask entry ever allows them
    q = query.index_select(2, q_index)
    k, v = key.index_select(2, kv_index), value.index_select(2, kv_index)
    if compiled if compiled is not None else query.is_cuda:
        fn = _compiled_flex()
    else:
        fn = _eager_flex
    if not return_lse:
        return fn(q, k, v, block_mask=mask, scale=scale).index_select(2, inverse)
    out, lse = _flex_with_lse(fn, q, k, v, mask, scale)
    return out.index_select(2, inverse), lse.index_select(2, inverse).float()


def _eager_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # uncompiled is a deliberate choice here (CPU, tests, small inputs); torch warns on every call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_with_lse(fn, q, k, v, mask, scale):
    try:  # torch >= 2.9 returns auxiliary outputs through AuxRequest; return_lse is deprecated there
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return fn(q, k, v, block_mask=mask, scale=scale, return_lse=True)
    out, aux = fn(q, k, v, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


_COMPILED = {}


def _compiled_flex():
    # torch.compile caches per function object; one compiled wrapper per process is what makes the
    # GPU kernel fast. This is a cache of a pure function, not configuration state.
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]
