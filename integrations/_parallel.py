"""What the multi-process modes share: process-group setup with timeouts, error translation, byte counts.

Used by :mod:`clear_adapters.integrations.halo` and :mod:`clear_adapters.integrations.xdit`; imports
torch only (no xfuser), so halo runs with plain ``torch.distributed``.

Byte accounting: "bytes sent" is what one rank puts on the wire, with the usual algorithms for
collectives -- point-to-point: the tensor; all-to-all: (P-1)/P of the buffer; all-gather: the local
part, P-1 times; all-reduce: 2(P-1)/P of the buffer (ring all-reduce). The strategies count at their
call sites; ``tests/test_parallel.py`` checks the counts against the collectives torch's profiler saw.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from clear_adapters.errors import ClearAdapterError

#: process-group timeout used by :func:`init_distributed` unless told otherwise
DEFAULT_TIMEOUT_S = 300.0
#: profiler range around every sequence-parallel attention call (what "per attention layer" counts)
ATTENTION_RANGE = "clear_adapters.sequence_parallel_attention"
MODES = ("ulysses", "ring", "halo")


class ParallelError(ClearAdapterError):
    """A multi-process run cannot go on: bad setup, a rank that died or hangs, a mismatched world."""


@dataclass
class CommStats:
    """Bytes this rank sent, inside attention layers and outside them (latent gathers)."""

    attention_calls: int = 0
    attention_bytes: int = 0
    other_bytes: int = 0

    @property
    def bytes_per_layer(self) -> float:
        return self.attention_bytes / self.attention_calls if self.attention_calls else 0.0

    def reset(self) -> None:
        self.attention_calls = self.attention_bytes = self.other_bytes = 0


@dataclass(eq=False)
class ParallelHandle:
    """What a multi-process mode installed on one model; :meth:`remove` takes it off (CLEAR stays)."""

    strategy: object  # has .context (the model's CLEAR context) and .stats
    hooks: list = field(default_factory=list)

    @property
    def stats(self) -> CommStats:
        return self.strategy.stats

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.strategy.context.sequence_parallel is self.strategy:
            self.strategy.context.sequence_parallel = None


def check_apply(pipe, model, mode: str, module: str):
    """Refuse ``<module>.apply(pipe)`` before any change; returns the model's CLEAR context."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("torch.distributed is not initialised; start under torchrun and call "
                            f"clear_adapters.integrations.{module}.init_distributed() first")
    if getattr(pipe, "controlnet", None) is not None:
        raise ParallelError(f"{mode} does not support ControlNet pipelines (their residuals are not split)")
    context = getattr(model, "_clear_context", None)
    if context is None:
        raise ParallelError(f"load CLEAR into the pipeline (clear_adapters.load/attach) before {module}.apply()")
    if context.sequence_parallel is not None:
        raise ParallelError("this model already runs a multi-process CLEAR mode; remove() it first")
    return context


def check_forward(module, context, arguments: dict, mode: str) -> None:
    """Refuse a transformer call the mode cannot split: CLEAR gone from the model, ControlNet residuals."""
    if getattr(module, "_clear_context", None) is not context:
        raise ParallelError(f"CLEAR was unloaded or reloaded while {mode} is applied; call the {mode} handle's "
                            "remove() before clear_adapters.unload()")
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if arguments.get(name) is not None:
            raise ParallelError(f"{mode} does not split ControlNet residuals; run ControlNet pipelines in one process")


def all_to_all_bytes(tensor_bytes: int, ranks: int) -> int:
    return tensor_bytes * (ranks - 1) // ranks


def all_gather_bytes(local_bytes: int, ranks: int) -> int:
    return local_bytes * (ranks - 1)


def all_reduce_bytes(tensor_bytes: int, ranks: int) -> int:
    return 2 * tensor_bytes * (ranks - 1) // ranks


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """``torch.distributed.init_process_group`` from the ``torchrun`` environment, with a timeout.

    A rank that never joins (a wrong ``--nproc_per_node``/``WORLD_SIZE``) raises :class:`ParallelError`
    after ``timeout_s`` instead of waiting forever; the same timeout bounds every later collective,
    so a rank that dies or hangs mid-run is reported too. ``backend``: nccl on CUDA, gloo otherwise.
    """
    if dist.is_initialized():
        return
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ParallelError("WORLD_SIZE is not set: start multi-process runs with torchrun "
                            "(torchrun --nproc_per_node=N script.py ...)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:  # DistStoreError (a RuntimeError) when ranks are missing
        raise ParallelError(
            f"rank {os.environ.get('RANK', '?')} could not form a group of {world} processes within "
            f"{timeout_s:.0f} s: did every rank start, and does WORLD_SIZE/--nproc_per_node match the ranks "
            f"you launched? ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def communication(what: str, group=None):
    """Turn a failed or timed-out collective into a :class:`ParallelError` that says what was going on."""
    try:
        yield
    except ParallelError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise ParallelError(
            f"rank {rank}: {what} failed -- another rank died, hung past the process-group timeout, or runs "
            f"a different world size or configuration ({type(exc).__name__}: {exc})") from exc


def check_same_everywhere(values: list[float], what: str, group=None) -> None:
    """Raise :class:`ParallelError` on every rank unless all ranks of ``group`` pass the same ``values``."""
    mine = torch.tensor(values, dtype=torch.float64)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    with communication(f"comparing the {what} of all ranks", group):
        dist.all_gather(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        if not torch.equal(theirs, mine):
            raise ParallelError(f"ranks disagree on the {what}: this rank has {values}, rank {rank} has "
                                f"{theirs.tolist()}; every rank must run the same command")


def gather_rows(tensor: torch.Tensor, counts: list[int], dim: int, group=None) -> torch.Tensor:
    """All-gather pieces of different lengths along ``dim`` (padded to the longest), in rank order."""
    longest = max(counts)
    pad = longest - tensor.shape[dim]
    if pad:
        shape = list(tensor.shape)
        shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    pieces = [torch.empty_like(tensor) for _ in counts]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, counts)], dim=dim)


# ------------------------------------------------------------------------------------------- formulas
def split_rows(height: int, ranks: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Balanced bands of whole rows (in units of ``multiple`` rows): [(start, stop), ...] per rank."""
    if height % multiple:
        raise ValueError(f"{height} rows are not a multiple of {multiple}")
    units = height // multiple
    if units < ranks:
        raise ParallelError(f"{height} token rows cannot be split into {ranks} bands of whole "
                            f"{multiple}-row blocks; use fewer ranks or a taller image")
    base, extra = divmod(units, ranks)
    bands, start = [], 0
    for rank in range(ranks):
        stop = start + (base + (rank < extra)) * multiple
        bands.append((start, stop))
        start = stop
    return bands


def halo_transfers(bands: list[tuple[int, int]], halo: int) -> list[tuple[int, int, int, int]]:
    """Row ranges each rank needs from each other rank: [(receiver, sender, row0, row1), ...].

    A rank owning rows [a, b) needs rows [a - halo, a) and [b, b + halo) (clipped to the image); they
    may come from several ranks when bands are shorter than the halo.
    """
    height = bands[-1][1]
    transfers = []
    for receiver, (a, b) in enumerate(bands):
        for lo, hi in ((max(0, a - halo), a), (b, min(height, b + halo))):
            for sender, (c, d) in enumerate(bands):
                r0, r1 = max(lo, c), min(hi, d)
                if sender != receiver and r0 < r1:
                    transfers.append((receiver, sender, r0, r1))
    return transfers


def bytes_per_layer(mode: str, *, height: int, width: int, text_len: int, heads: int, head_dim: int, ranks: int,
                    window_size: float = 16, down_factor: int = 1, element_size: int = 2, batch: int = 1,
                    bands: list[tuple[int, int]] | None = None) -> int:
    """Bytes one rank sends per attention layer (the busiest rank), by the formulas of each mode.

    ``height`` x ``width`` image tokens, ``text_len`` text tokens, C = heads * head_dim channels, P ranks:

    * ulysses: q, k, v all-to-all in, output all-to-all back: ``4 * (T+N)/P * C * (P-1)/P`` elements;
    * ring (torch's all-gather rotation, as xfuser runs it): K and V of each rank to every other rank:
      ``2 * (T+N)/P * C * (P-1)``; (T+N)/P becomes T + N/P when P does not divide T;
    * halo: K and V of the boundary rows to each neighbour, ``2 * (ceil(r)-1) * W * C`` per side,
      plus the text merge in float32 (all-reduce of ``T*C + 2*T*heads`` values) and, for d > 1, the
      all-gather of the pooled K and V of the rank's band.
    """
    channels = heads * head_dim
    # xfuser splits the text too when its length divides by P (FLUX's 512 does), else every rank holds it all
    per_rank = (text_len / ranks if text_len % ranks == 0 else text_len) + height * width / ranks
    if ranks == 1:
        return 0
    if mode == "ulysses":
        return int(math.ceil(4 * per_rank * channels * (ranks - 1) / ranks * batch * element_size))
    if mode == "ring":
        return int(math.ceil(2 * per_rank * channels * (ranks - 1) * batch * element_size))
    if mode != "halo":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bands = bands or split_rows(height, ranks, down_factor)
    halo = math.ceil(window_size) - 1
    sent = [0] * ranks
    for _, sender, r0, r1 in halo_transfers(bands, halo):
        sent[sender] += 2 * (r1 - r0) * width * channels * batch * element_size
    text_merge = all_reduce_bytes((text_len * channels + 2 * text_len * heads) * batch * 4, ranks)
    pooled = 0
    if down_factor > 1:
        pooled = max(all_gather_bytes(2 * (b - a) // down_factor * width // down_factor * channels * batch
                                      * element_size, ranks) for a, b in bands)
    return max(sent) + text_merge + pooled
