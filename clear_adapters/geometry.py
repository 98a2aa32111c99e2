"""Token geometry of one joint FLUX sequence: text tokens, then one or more image grids (pure torch).

The canonical token order is ``[text (T tokens), grid 0 row-major, grid 1 row-major, ...]`` — what
diffusers' FLUX models build from ``cat([txt_ids, img_ids])``. Each grid is a rectangle of latent
tokens (after the 2x2 patchify) identified by ``img_ids[:, 0]`` (the *frame*: 0 for the generated image,
1 for Kontext reference images), and its absolute row/column coordinates ``img_ids[:, 1:3]``.

Several images in one sequence follow one rule: the window is measured on the (row, column)
coordinates only, whatever the frame. A token at (y, x) of the generated image therefore sees the
tokens of a Kontext reference image around the same (y, x) — the reference is spatially aligned with
the target, and the cost stays linear in the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ClearConfig
from .errors import InvalidArgumentError


@dataclass(frozen=True)
class ImageGrid:
    """A rectangle of image tokens stored row-major in the sequence."""

    frame: int
    height: int
    width: int
    row0: int  # absolute row coordinate of the first row
    col0: int  # absolute column coordinate of the first column
    start: int  # offset of the first token within the image part of the sequence

    @property
    def size(self) -> int:
        return self.height * self.width


@dataclass(eq=False)
class Geometry:
    """Where every token of a joint sequence sits. Hashable by identity; carries its own caches.

    Build it with :meth:`from_ids` (from FLUX ``img_ids``) or :meth:`from_grid`. Kernels store
    masks, gather plans and block masks in :attr:`cache`, so they are built once per geometry.
    """

    text_len: int
    rows: torch.Tensor  # (N_img,) int64, CPU: absolute row of each image token, canonical order
    cols: torch.Tensor  # (N_img,) int64
    frames: torch.Tensor  # (N_img,) int64
    grids: tuple[ImageGrid, ...] | None  # None when the image tokens are not a union of row-major grids
    cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_grid(cls, height: int, width: int, text_len: int = 0, *, frames: int = 1) -> "Geometry":
        """``frames`` stacked grids of ``height x width`` tokens (frame ids 0..frames-1) after ``text_len`` text tokens."""
        if height < 1 or width < 1 or frames < 1:
            raise ValueError(f"grid must be at least 1x1 with >= 1 frame, got {height}x{width}x{frames}")
        ids = []
        for f in range(frames):
            r, c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            ids.append(torch.stack([torch.full_like(r, f), r, c], dim=-1).reshape(-1, 3))
        return cls.from_ids(torch.cat(ids), text_len)

    @classmethod
    def from_ids(cls, img_ids: torch.Tensor, text_len: int) -> "Geometry":
        """Geometry of ``text_len`` text tokens followed by image tokens with FLUX ``img_ids`` (N, 3)."""
        if img_ids.ndim == 3:  # deprecated batched ids: diffusers uses the first item too
            img_ids = img_ids[0]
        if img_ids.ndim != 2 or img_ids.shape[-1] < 3:
            raise ValueError(f"img_ids must have shape (N, 3), got {tuple(img_ids.shape)}")
        if text_len < 0:
            raise ValueError(f"text_len must be >= 0, got {text_len}")
        raw = img_ids[:, :3].detach().to("cpu")
        ids = raw.to(torch.float64).round().to(torch.int64)
        frames, rows, cols = ids.unbind(-1)
        grids = _find_grids(frames, rows, cols)
        if grids is None and raw.is_floating_point() and torch.finfo(raw.dtype).bits < 32:
            # Pipelines build ids in the model dtype; bf16 cannot hold integers above 256 exactly, so a
            # 4608 px wide image has repeated column ids. Recover the grid whose ids round to these.
            grids = _recover_low_precision_grids(raw, frames)
            if grids is not None:
                rows, cols = _grid_coordinates(grids)
        return cls(text_len=int(text_len), rows=rows.contiguous(), cols=cols.contiguous(),
                   frames=frames.contiguous(), grids=grids)

    # ------------------------------------------------------------------ sizes
    @property
    def image_len(self) -> int:
        return int(self.rows.numel())

    @property
    def total_len(self) -> int:
        return self.text_len + self.image_len

    def describe(self) -> str:
        if self.grids is None:
            return f"text {self.text_len} + {self.image_len} image tokens (unstructured)"
        parts = " + ".join(f"{g.height}x{g.width}" for g in self.grids)
        return f"text {self.text_len} + image {parts}"

    def pooled_len(self, down_factor: int) -> int:
        """Number of pooled K/V tokens for ``down_factor`` (0 when d == 1)."""
        if down_factor == 1:
            return 0
        return sum(g.size // (down_factor * down_factor) for g in self.require_grids(down_factor))

    def require_grids(self, down_factor: int = 1) -> tuple[ImageGrid, ...]:
        """The grids, checking they exist and that ``down_factor`` divides each of them."""
        if self.grids is None:
            raise ValueError("image tokens are not a union of row-major grids; only the dense kernel with "
                             "down_factor=1 handles such sequences")
        for g in self.grids:
            if g.height % down_factor or g.width % down_factor:
                # in tokens: pixels per token depend on the pipeline, which the processors know
                raise InvalidArgumentError(
                    f"image grid {g.height}x{g.width} tokens is not divisible by down_factor {down_factor}; "
                    f"use image sizes whose token grid divides by {down_factor}")
        return self.grids

    # ------------------------------------------------------------------ the pattern
    def token_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(is_image, row, col) for every token of the canonical sequence (text rows/cols are 0)."""
        key = "token_table"
        if key not in self.cache:
            is_image = torch.zeros(self.total_len, dtype=torch.bool)
            is_image[self.text_len:] = True
            pad = torch.zeros(self.text_len, dtype=torch.int64)
            self.cache[key] = (is_image, torch.cat([pad, self.rows]), torch.cat([pad, self.cols]))
        return self.cache[key]

    def allowed(self, config: ClearConfig, query_index: torch.Tensor | None = None,
                key_index: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask (Nq, Nk + pooled) of the CLEAR pattern, on CPU.

        ``query_index``/``key_index`` select tokens of the canonical sequence (default: all, in order).
        Pooled keys (d > 1) are appended after the selected keys and are only allowed for image queries.
        """
        is_image, row, col = self.token_table()
        qi = torch.arange(self.total_len) if query_index is None else query_index.cpu()
        ki = torch.arange(self.total_len) if key_index is None else key_index.cpu()
        q_img, k_img = is_image[qi], is_image[ki]
        # int32 and in place: this is the one (Nq x Nk) temporary of the dense path
        dist = (row[qi].int()[:, None] - row[ki].int()[None, :]).square_()
        dist += (col[qi].int()[:, None] - col[ki].int()[None, :]).square_()
        inside = dist < float(config.window_size) ** 2
        mask = ~q_img[:, None] | ~k_img[None, :] | inside
        pooled = self.pooled_len(config.down_factor)
        if pooled:
            mask = torch.cat([mask, q_img[:, None].expand(-1, pooled)], dim=1)
        return mask

    def window_pair_count(self, window_size: float) -> int:
        """Number of (image query, image key) pairs inside the window, computed without an N x N mask."""
        r2 = float(window_size) ** 2
        reach = int(window_size) + 1
        offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                   if dy * dy + dx * dx < r2]
        if self.grids is None:  # fall back to the mask, in chunks
            total = 0
            idx = torch.arange(self.text_len, self.total_len)
            for chunk in idx.split(4096):
                total += int(self.allowed(ClearConfig(window_size), chunk, idx).sum())
            return total
        total = 0
        for g in self.grids:
            for h in self.grids:
                # overlap of the two coordinate rectangles shifted by each offset
                for dy, dx in offsets:
                    rows = _overlap(g.row0, g.height, h.row0 + dy, h.height)
                    cols = _overlap(g.col0, g.width, h.col0 + dx, h.width)
                    total += rows * cols
        return total

    def attention_flops(self, head_dim: int, heads: int, config: ClearConfig | None = None,
                        batch: int = 1) -> int:
        """Attention FLOPs of one layer (QK^T and PV, 2 FLOPs per MAC): 4 * allowed pairs * channels.

        ``config=None`` counts full attention.
        """
        t, n = self.text_len, self.image_len
        if config is None:
            pairs = (t + n) ** 2
        else:
            pairs = t * (t + n) + n * t + self.window_pair_count(config.window_size)
            pairs += n * self.pooled_len(config.down_factor)
        return 4 * pairs * head_dim * heads * batch


def _overlap(a0: int, alen: int, b0: int, blen: int) -> int:
    return max(0, min(a0 + alen, b0 + blen) - max(a0, b0))


def _find_grids(frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[ImageGrid, ...] | None:
    """Split image tokens into consecutive row-major rectangles (one per frame run), or None."""
    n = rows.numel()
    if n == 0:
        return ()
    change = torch.nonzero(frames[1:] != frames[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    grids = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        r, c = rows[a:b], cols[a:b]
        row0, col0 = int(r[0]), int(c[0])
        width = int(torch.count_nonzero(r == row0))
        if width == 0 or (b - a) % width:
            return None
        height = (b - a) // width
        expect_r = (row0 + torch.arange(height)).repeat_interleave(width)
        expect_c = (col0 + torch.arange(width)).repeat(height)
        if not (torch.equal(r, expect_r) and torch.equal(c, expect_c)):
            return None
        grids.append(ImageGrid(int(frames[a]), height, width, row0, col0, a))
    return tuple(grids)


def _grid_coordinates(grids) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = [], []
    for g in grids:
        rows.append((g.row0 + torch.arange(g.height)).repeat_interleave(g.width))
        cols.append((g.col0 + torch.arange(g.width)).repeat(g.height))
    return torch.cat(rows), torch.cat(cols)


def _recover_low_precision_grids(raw: torch.Tensor, frames: torch.Tensor) -> tuple[ImageGrid, ...] | None:
    """Grids whose exact ids, cast to ``raw.dtype``, equal ``raw`` (one per frame run), or None."""
    n = raw.shape[0]
    change = torch.nonzero(frames[1:] != frames[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    grids = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        run = raw[a:b]
        row0, col0 = int(run[0, 1].double().round()), int(run[0, 2].double().round())
        length, found = b - a, None
        for width in (w for w in range(1, length + 1) if length % w == 0):
            height = length // width
            exact_r = (row0 + torch.arange(height)).repeat_interleave(width).to(raw.dtype)
            exact_c = (col0 + torch.arange(width)).repeat(height).to(raw.dtype)
            if torch.equal(exact_r, run[:, 1]) and torch.equal(exact_c, run[:, 2]):
                if found is not None:  # two grids round to the same ids: refuse to guess
                    return None
                found = ImageGrid(int(frames[a]), height, width, row0, col0, a)
        if found is None:
            return None
        grids.append(found)
    return tuple(grids)
