"""Exact patch-parallel CLEAR inference ("halo" mode) over ``torch.distributed``.

CLEAR's window makes attention local, so the image can be cut into bands of whole token rows, one per
rank, and each rank needs only the K/V of the ``ceil(r) - 1`` rows next to its band from its
neighbours. Per attention layer, on each rank:

* image queries of the band attend the text keys (every rank holds the whole text), the band's own
  K/V and the halo rows received point-to-point from the neighbours (several ranks when bands are
  shorter than the halo) -- the fast ``tiled``/``flex`` kernels run on that local strip;
* text queries attend the text keys (counted on rank 0) and the band's image keys; the partial
  results of all ranks are combined exactly by log-sum-exp (two all-reduces);
* with a down factor d > 1 each rank pools the d x d blocks of its band (bands are whole blocks) and
  the pooled K/V are all-gathered: image queries attend all of them, as in one process;
* everything else (projections, MLPs, norms, the text stream) runs locally; the transformer's output
  is all-gathered after every call, so the pipeline's latents, scheduler and VAE are unchanged.

The result equals single-process CLEAR up to float rounding: nothing is stale or approximated
(the paper's DistriFusion-style multi-GPU version is approximate). Communication per layer and rank
is ``2 x halo rows x width x channels`` per neighbour -- independent of the image height and of the
number of ranks -- plus the text merge; see :func:`~clear_adapters.integrations._parallel.bytes_per_layer`.

Use (under ``torchrun``; ``init_distributed`` sets timeouts so a dead rank is an error, not a hang)::

    from clear_adapters.integrations import halo
    halo.init_distributed()
    clear_adapters.load("flux-dev", pipe)
    handle = halo.apply(pipe)            # xfuser's sequence-parallel group when xfuser is set up, else WORLD
    image = pipe(prompt, height=4096, width=4096).images[0]   # every rank gets the full image
    handle.remove()

Limits: one image grid per sequence (no Kontext reference images), no ControlNet, no caller
attention mask; the text and the latents are replicated on every rank.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.profiler import record_function

from clear_adapters.geometry import Geometry
from clear_adapters.kernels import clear_attention, merge_partials
from clear_adapters.kernels.common import pooled_kv
from clear_adapters.kernels.partial import full_attention_lse

from ._parallel import (ATTENTION_RANGE, DEFAULT_TIMEOUT_S, CommStats, ParallelError, ParallelHandle,
                        all_gather_bytes, all_reduce_bytes, bytes_per_layer, check_apply, check_forward,
                        check_same_everywhere, communication, gather_rows, halo_transfers, init_distributed, nbytes,
                        split_rows)

__all__ = ["apply", "HaloHandle", "ParallelError", "init_distributed", "bytes_per_layer", "DEFAULT_TIMEOUT_S"]


def default_group():
    """xfuser's sequence-parallel group when xfuser has set up its groups in this process, else WORLD."""
    if "xfuser" in sys.modules:  # never import xfuser here: halo must work without it
        from xfuser.core.distributed import get_sp_group, model_parallel_is_initialized

        if model_parallel_is_initialized():
            return get_sp_group().device_group
    return dist.group.WORLD


@dataclass
class _Forward:
    """What one transformer call looks like on this rank."""

    geometry: Geometry  # the whole sequence
    text_len: int
    frame: int
    row0: int
    col0: int
    height: int
    width: int
    bands: list  # [(first row, stop row)] per rank, grid-local


class HaloParallel:
    """The halo strategy of one model (installed as its CLEAR context's ``sequence_parallel``)."""

    def __init__(self, model, group, bands: list[int] | None):
        self.model = model
        self.context = model._clear_context
        self.group = group
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_world_size(group)
        self.band_rows = bands
        self.stats = CommStats()
        self.current: _Forward | None = None
        self._signature = inspect.signature(model.forward)

    # ------------------------------------------------------------------ bands
    def bands_for(self, height: int, down_factor: int) -> list[tuple[int, int]]:
        if self.band_rows is None:
            return split_rows(height, self.ranks, down_factor)
        if sum(self.band_rows) != height or any(n < 1 or n % down_factor for n in self.band_rows):
            raise ParallelError(f"bands {self.band_rows} must be positive multiples of the down factor "
                                f"{down_factor} summing to the {height} token rows of this image")
        edges = [0]
        for n in self.band_rows:
            edges.append(edges[-1] + n)
        return list(zip(edges[:-1], edges[1:]))

    def _peer(self, rank: int) -> int:
        return rank if self.group is dist.group.WORLD else dist.get_global_rank(self.group, rank)

    # ------------------------------------------------------------------ model hooks
    def pre_forward(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        check_forward(module, self.context, arguments, "halo mode")
        hidden, img_ids = arguments.get("hidden_states"), arguments.get("img_ids")
        text = arguments.get("encoder_hidden_states")
        if hidden is None or img_ids is None or text is None:
            raise ParallelError("halo mode needs hidden_states, encoder_hidden_states and img_ids as the FLUX "
                                "pipelines pass them")
        geometry = self.context.geometry(text.shape[1])
        grids = geometry.grids
        if grids is None or len(grids) != 1 or hidden.shape[1] != geometry.image_len:
            raise ParallelError(f"halo mode splits one image grid per sequence; got {geometry.describe()}")
        grid = grids[0]
        down = self._down_factor()
        geometry.require_grids(down)
        bands = self.bands_for(grid.height, down)
        if len(bands) != self.ranks:
            raise ParallelError(f"{len(bands)} bands for {self.ranks} ranks")
        self.current = _Forward(geometry, geometry.text_len, grid.frame, grid.row0, grid.col0, grid.height,
                                grid.width, bands)
        a, b = bands[self.rank]
        w = grid.width
        arguments["hidden_states"] = hidden[:, a * w:b * w]
        arguments["img_ids"] = img_ids[..., a * w:b * w, :]
        return bound.args, bound.kwargs

    def post_forward(self, module, args, kwargs, output):
        fwd, self.current = self.current, None
        sample = output[0] if isinstance(output, tuple) else output.sample
        counts = [(b - a) * fwd.width for a, b in fwd.bands]
        with communication("gathering the transformer output of all bands", self.group):
            full = gather_rows(sample, counts, dim=1, group=self.group)
        self.stats.other_bytes += all_gather_bytes(nbytes(sample) * max(counts) // sample.shape[1], self.ranks)
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.sample = full
        return output

    def _down_factor(self) -> int:
        from clear_adapters.weights import attention_layers

        factors = {a._clear_state.config.down_factor for _, a in attention_layers(self.model)
                   if getattr(a, "_clear_state", None) is not None}
        if len(factors) != 1:
            raise ParallelError(f"halo mode needs one down factor for every layer, found {sorted(factors)}")
        return factors.pop()

    # ------------------------------------------------------------------ attention
    def attention(self, attn, state, query, key, value, text_len, attention_mask):
        """CLEAR attention for this rank's band; (B, T + band tokens, H*D) like the single-process processor."""
        fwd = self.current
        if fwd is None:
            raise ParallelError("halo attention ran outside a transformer call; call the transformer, not its "
                                "attention layers")
        if attention_mask is not None:
            raise ParallelError("halo mode does not take a caller attention_mask")
        a, b = fwd.bands[self.rank]
        text, width = fwd.text_len, fwd.width
        if query.shape[1] != text + (b - a) * width or (text_len is not None and text_len != text):
            raise ParallelError(f"{state.name}: expected {text} text + {(b - a) * width} band tokens, got "
                                f"{query.shape[1]} tokens")
        config = state.config
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
        scale = config.softmax_scale(q.shape[-1], fwd.geometry.total_len)
        with record_function(ATTENTION_RANGE):
            self.stats.attention_calls += 1
            image_out, image_lse = self._image_window(q, k, v, fwd, config, scale)
            if config.down_factor > 1:
                pooled_out, pooled_lse = self._pooled(q, k, v, fwd, state, scale)
                image_out, _ = merge_partials([image_out, pooled_out], [image_lse, pooled_lse])
            text_out = self._text(q, k, v, fwd, scale)
        out = torch.cat([text_out.to(q.dtype), image_out.to(q.dtype)], dim=2)
        return out.transpose(1, 2).flatten(2, 3)

    def _image_window(self, q, k, v, fwd: _Forward, config, scale):
        """Band queries against text + band + halo rows, on the local strip with the fast kernels."""
        text, width = fwd.text_len, fwd.width
        a, b = fwd.bands[self.rank]
        halo = config.halo
        kv = torch.stack([k[:, :, text:], v[:, :, text:]])  # (2, B, H, band tokens, D)
        pieces = {a: kv}
        sends, recvs = [], []
        for receiver, sender, r0, r1 in halo_transfers(fwd.bands, halo):
            if sender == self.rank:
                sends.append((receiver, kv[:, :, :, (r0 - a) * width:(r1 - a) * width].contiguous()))
            elif receiver == self.rank:
                buffer = kv.new_empty(*kv.shape[:3], (r1 - r0) * width, kv.shape[-1])
                recvs.append((sender, buffer))
                pieces[r0] = buffer
        if sends or recvs:
            ops = [dist.P2POp(dist.isend, t, self._peer(peer), self.group) for peer, t in sends]
            ops += [dist.P2POp(dist.irecv, t, self._peer(peer), self.group) for peer, t in recvs]
            with communication(f"halo exchange of rows with ranks {sorted({p for p, _ in sends + recvs})}",
                               self.group):
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            self.stats.attention_bytes += sum(nbytes(t) for _, t in sends)
        starts = sorted(pieces)
        local_kv = torch.cat([pieces[s] for s in starts], dim=3)
        lo = starts[0]
        hi = lo + local_kv.shape[3] // width
        geometry = self._local_geometry(fwd, lo, hi)
        # queries of the halo rows are not here; zeros stand in and their outputs are dropped
        q_img = q[:, :, text:]
        before, after = (a - lo) * width, (hi - b) * width
        q_local = torch.cat([q[:, :, :text], q_img.new_zeros(*q_img.shape[:2], before, q_img.shape[-1]), q_img,
                             q_img.new_zeros(*q_img.shape[:2], after, q_img.shape[-1])], dim=2)
        k_local = torch.cat([k[:, :, :text], local_kv[0]], dim=2)
        v_local = torch.cat([v[:, :, :text], local_kv[1]], dim=2)
        out, lse = clear_attention(q_local, k_local, v_local, geometry, replace(config, down_factor=1),
                                   scale=scale, return_lse=True)
        rows = slice(text + before, text + before + (b - a) * width)
        return out[:, :, rows], lse[:, :, rows]

    def _local_geometry(self, fwd: _Forward, lo: int, hi: int) -> Geometry:
        cache_key = ("halo-strip", lo, hi)
        geometry = fwd.geometry.cache.get(cache_key)
        if geometry is None:
            rows, cols = torch.meshgrid(torch.arange(fwd.row0 + lo, fwd.row0 + hi),
                                        torch.arange(fwd.col0, fwd.col0 + fwd.width), indexing="ij")
            ids = torch.stack([torch.full_like(rows, fwd.frame), rows, cols], dim=-1).reshape(-1, 3)
            geometry = Geometry.from_ids(ids, fwd.text_len)
            fwd.geometry.cache[cache_key] = geometry
        return geometry

    def _pooled(self, q, k, v, fwd: _Forward, state, scale):
        """Band queries against the pooled K/V of the whole image (each rank pools its band, all-gather)."""
        text, width, d = fwd.text_len, fwd.width, state.config.down_factor
        a, b = fwd.bands[self.rank]
        band_geometry = self._local_geometry(fwd, a, b)
        pk, pv = pooled_kv(k, v, band_geometry, d, state.spatial_weight)
        pkv = torch.stack([pk, pv])
        counts = [(y1 - y0) // d * (width // d) for y0, y1 in fwd.bands]
        with communication("all-gather of the pooled K/V", self.group):
            full = gather_rows(pkv, counts, dim=3, group=self.group)
        self.stats.attention_bytes += all_gather_bytes(nbytes(pkv) * max(counts) // max(pkv.shape[3], 1),
                                                       self.ranks)
        return full_attention_lse(q[:, :, text:], full[0], full[1], scale)

    def _text(self, q, k, v, fwd: _Forward, scale):
        """Text queries against every key: each rank's share (text keys on rank 0), merged exactly."""
        text = fwd.text_len
        first = 0 if self.rank == 0 else text
        out, lse = full_attention_lse(q[:, :, :text], k[:, :, first:], v[:, :, first:], scale)
        if self.ranks == 1:
            return out
        with communication("merging the text-query partial results of all ranks", self.group):
            peak = lse.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
            weight = torch.exp(lse - peak)
            merged = torch.cat([(out.float() * weight[..., None]).flatten(), weight.flatten()])
            dist.all_reduce(merged, group=self.group)
        self.stats.attention_bytes += all_reduce_bytes(nbytes(peak), self.ranks) + \
            all_reduce_bytes(nbytes(merged), self.ranks)
        numerator, denominator = merged.split([out.numel(), weight.numel()])
        return (numerator.view(out.shape) / denominator.view(weight.shape)[..., None]).to(out.dtype)


class HaloHandle(ParallelHandle):
    """What :func:`apply` installed; :meth:`remove` takes it off (CLEAR stays)."""

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def ranks(self) -> int:
        return self.strategy.ranks


def apply(pipe, *, group=None, bands: list[int] | None = None) -> HaloHandle:
    """Run ``pipe``'s CLEAR transformer in halo mode across the ranks of ``group``.

    Args:
        pipe: a FLUX pipeline (or its transformer) with CLEAR already loaded, on this rank's device.
        group: the process group; default: xfuser's sequence-parallel group when xfuser's groups are
            set up in this process, else the default (WORLD) group.
        bands: token rows per rank (top to bottom), e.g. ``[5, 3]``; default: balanced, in whole
            ``d``-row blocks. Must sum to the image's token rows at every call.

    Every rank must call this with the same arguments (checked). Raises :class:`ParallelError` before
    changing anything when torch.distributed is not initialised, CLEAR is not loaded, the pipeline
    has a ControlNet or the ranks disagree.
    """
    model = getattr(pipe, "transformer", pipe)
    context = check_apply(pipe, model, "halo mode", "halo")
    if type(model).__module__.startswith("xfuser"):
        raise ParallelError("halo mode runs on the plain diffusers transformer, not on xfuser's wrapper")
    group = group if group is not None else default_group()
    if bands is not None and len(bands) != dist.get_world_size(group):
        raise ParallelError(f"{len(bands)} bands given for {dist.get_world_size(group)} ranks")
    states = [a._clear_state for a in _attention_modules(model)]
    config = states[0].config
    check_same_everywhere([dist.get_world_size(group), float(config.window_size), config.down_factor,
                           len(bands or []), *(bands or [])], "halo setup (ranks, window, down factor, bands)",
                          group)
    strategy = HaloParallel(model, group, bands)
    handle = HaloHandle(strategy)
    handle.hooks.append(model.register_forward_pre_hook(strategy.pre_forward, with_kwargs=True))
    handle.hooks.append(model.register_forward_hook(strategy.post_forward, with_kwargs=True))
    context.sequence_parallel = strategy
    return handle


def _attention_modules(model):
    from clear_adapters.weights import attention_layers

    modules = [a for _, a in attention_layers(model) if getattr(a, "_clear_state", None) is not None]
    if not modules:
        raise ParallelError("no CLEAR attention layer found in the model")
    return modules

