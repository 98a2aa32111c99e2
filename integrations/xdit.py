"""CLEAR inside xDiT (xfuser) sequence parallelism: Ulysses, ring and their hybrid (USP).

xfuser's FLUX attention ignores masks (its issue #503), so a CLEAR pipeline cannot simply be handed to
it. :func:`apply` keeps xfuser's own machinery and puts CLEAR where its attention kernel sits:

* the transformer becomes xfuser's ``xFuserFlux1Transformer2DWrapper`` (the class xfuser's runner
  loads FLUX.1 with): it splits text and image tokens into one chunk per sequence-parallel rank and
  all-gathers the output -- xfuser code, xfuser process groups, xfuser ``EngineConfig``;
* CLEAR's processors stay installed; per layer they project, apply RoPE and call xfuser's ``USP``
  with an attention function registered in xfuser's ``ATTENTION_FUNCTION_REGISTRY`` under
  :data:`BACKEND`. USP does the Ulysses all-to-all and/or the ring rotation; the function knows the
  canonical position of every token it receives -- after the all-to-all the order is interleaved by
  rank (``[txt_0, img_0, txt_1, img_1, ...]``) and, in ring steps, each key block is another rank's
  chunk -- and runs the CLEAR kernels on those positions:

  - Ulysses: every rank holds the whole sequence for its heads, a permutation of the canonical
    order, so the linear ``tiled``/``flex`` kernels run on it (a duplicated text is counted once);
  - ring: each step is one query block against one key block, with log-sum-exp for xfuser's merge;
    image keys no image query can reach are skipped (a far block costs its text part only) --
    :func:`clear_adapters.kernels.partial.block_attention`.

Supported: xfuser :data:`SUPPORTED_XFUSER` (checked when this module is imported), FLUX.1 pipelines,
``ulysses_degree`` x ``ring_degree`` sequence parallelism; down factor d > 1 with Ulysses only (the
pooled keys need the whole image); image tokens divisible by the sequence-parallel degree (xfuser
0.7.0's padding path calls a method that does not exist). Not supported: PipeFusion (stale K/V),
tensor / CFG / data parallelism, ControlNet, xfuser's FP8 communication.

Use (under ``torchrun``)::

    from xfuser.config import xFuserArgs
    from clear_adapters.integrations import xdit
    xdit.init_distributed()                                       # with a timeout
    engine_config, _ = xFuserArgs(model=..., ulysses_degree=2).create_config()
    clear_adapters.load("flux-dev", pipe)
    handle = xdit.apply(pipe, engine_config)
    image = pipe(prompt, height=2048, width=2048).images[0]
    handle.remove()
"""

from __future__ import annotations

import importlib.metadata
import inspect
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from clear_adapters.kernels import clear_attention
from clear_adapters.kernels.partial import block_attention

from ._parallel import (ATTENTION_RANGE, DEFAULT_TIMEOUT_S, CommStats, ParallelError, ParallelHandle,
                        all_gather_bytes, all_to_all_bytes, bytes_per_layer, check_apply, check_forward,
                        communication, init_distributed, nbytes)

__all__ = ["apply", "XDiTHandle", "ParallelError", "init_distributed", "bytes_per_layer", "BACKEND",
           "SUPPORTED_XFUSER", "DEFAULT_TIMEOUT_S"]

#: the xfuser releases this module is written and tested against (it uses xfuser's FLUX wrapper, USP,
#: runtime state and attention registry, which change between minor releases)
SUPPORTED_XFUSER = (">=0.7.0", "<0.8")
_MIN, _BELOW = (0, 7, 0), (0, 8)
#: the key of CLEAR's function in xfuser's ATTENTION_FUNCTION_REGISTRY
BACKEND = "clear_adapters"
_KWARG = "clear_adapters"


class XDiTVersionError(ParallelError, ImportError):
    """The installed xfuser is outside :data:`SUPPORTED_XFUSER`."""


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def xfuser_version() -> str | None:
    """The installed xfuser version, or None (read from package metadata, without importing xfuser)."""
    try:
        return importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_xfuser_version(version: str | None = None) -> None:
    """Raise :class:`XDiTVersionError` unless ``version`` (default: installed) is in the supported range."""
    version = xfuser_version() if version is None else version
    if version is None:
        raise XDiTVersionError("xfuser is not installed; install it with: pip install 'clear-adapters[xdit]' "
                               f"(xfuser {','.join(SUPPORTED_XFUSER)})")
    release = _release(version)
    if not (_MIN <= release and release[:2] < _BELOW):
        raise XDiTVersionError(f"xfuser {version} is not supported: clear_adapters.integrations.xdit works with "
                               f"xfuser {','.join(SUPPORTED_XFUSER)}; pip install 'xfuser>=0.7,<0.8'")


# Checked at import: an installed xfuser of another release fails here with the range to install, not later
# inside xfuser's internals. A missing xfuser is reported by apply(), so the package imports without it.
if xfuser_version() is not None:
    check_xfuser_version()


# ------------------------------------------------------------------------------------- attention function
@dataclass(eq=False)
class _Call:
    """Everything the registered attention function needs for one layer call (passed through USP)."""

    geometry: object
    config: object
    spatial_weight: torch.Tensor | None
    scale: float
    blocks: list  # canonical positions held by each ring rank (its Ulysses group's chunks, in order)
    ring_rank: int
    text_split: bool  # False: every chunk carries the whole text (count it once: ring block 0)
    step: int = 0


def _first_occurrences(positions: torch.Tensor):
    """(unique positions in first-seen order, their indices, index mapping every entry to its unique one)."""
    uniq, inverse = torch.unique(positions, return_inverse=True)
    first = torch.full((uniq.numel(),), positions.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(positions.numel()), reduce="amin")
    order = torch.argsort(first)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(order.numel())
    return positions[first[order]], first[order], rank_of[inverse]


def clear_usp_attention(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None):
    """xfuser attention function: CLEAR on the tokens USP hands over; returns ``(out, lse)``."""
    call: _Call = (attention_kwargs or {}).get(_KWARG)
    if call is None or dropout_p or is_causal:
        raise ParallelError(f"the {BACKEND!r} attention function runs only inside CLEAR's processors "
                            "(no dropout, not causal)")
    if len(call.blocks) == 1:  # Ulysses: the whole sequence, heads split
        positions = call.blocks[0]
        if call.text_split:
            return clear_attention(query, key, value, call.geometry, call.config, spatial_weight=call.spatial_weight,
                                   query_index=positions, key_index=positions, scale=call.scale), None
        uniq, first, back = _first_occurrences(positions)
        first = first.to(query.device)
        q, k, v = (t.index_select(2, first) for t in (query, key, value))
        out = clear_attention(q, k, v, call.geometry, call.config, spatial_weight=call.spatial_weight,
                              query_index=uniq, key_index=uniq, scale=call.scale)
        return out.index_select(2, back.to(out.device)), None
    # ring: this call is one step; USP hands key blocks in the order of torch's ring rotation
    source = (call.ring_rank - call.step) % len(call.blocks)
    call.step += 1
    key_positions = call.blocks[source]
    if not call.text_split:
        uniq, first, _ = _first_occurrences(key_positions)
        first = first.to(key.device)
        key, value, key_positions = key.index_select(2, first), value.index_select(2, first), uniq
    return block_attention(query, key, value, call.geometry, call.config, call.blocks[call.ring_rank],
                           key_positions, scale=call.scale,
                           count_text_keys=call.text_split or source == 0)


# ------------------------------------------------------------------------------------------- strategy
class XDiTParallel:
    """CLEAR attention through xfuser's USP for one model (its CLEAR context's ``sequence_parallel``)."""

    def __init__(self, model, layout: dict):
        self.model = model
        self.context = model._clear_context
        self.layout = layout  # ulysses / ring sizes and ranks, sp size and rank
        self.stats = CommStats()
        self._signature = inspect.signature(model.forward)

    def pre_forward(self, module, args, kwargs):
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        check_forward(module, self.context, arguments, "xDiT")
        hidden = arguments.get("hidden_states")
        sp = self.layout["sp"]
        if hidden is not None and hidden.shape[1] % sp:
            raise ParallelError(
                f"{hidden.shape[1]} image tokens cannot be split into {sp} equal sequence-parallel chunks; "
                f"xfuser {xfuser_version()} cannot pad FLUX sequences (it calls a missing _pad_to_sp_divisible); "
                f"choose a height and width whose token count is a multiple of {sp}")
        return None

    def _blocks(self, geometry, text_local: int, image_local: int, split_text: bool) -> list:
        cache_key = ("xdit-blocks", text_local, image_local, split_text, self.layout["ulysses"], self.layout["ring"])
        blocks = geometry.cache.get(cache_key)
        if blocks is None:
            text = geometry.text_len
            ulysses, ring = self.layout["ulysses"], self.layout["ring"]

            def chunk(sp_rank):  # what xfuser's wrapper leaves on one sequence-parallel rank
                txt = torch.arange(sp_rank * text_local, (sp_rank + 1) * text_local) if split_text \
                    else torch.arange(text)
                img = text + torch.arange(sp_rank * image_local, (sp_rank + 1) * image_local)
                return torch.cat([txt, img])

            # yunchang's layout (xfuser's): sp rank = ring rank * ulysses degree + ulysses rank
            blocks = [torch.cat([chunk(r * ulysses + u) for u in range(ulysses)]) for r in range(ring)]
            geometry.cache[cache_key] = blocks
        return blocks

    def attention(self, attn, state, query, key, value, text_len, attention_mask):
        """CLEAR attention for this rank's chunk through xfuser's USP; (B, S_local, H*D)."""
        from xfuser.core.distributed import get_runtime_state
        from xfuser.model_executor.layers.usp import USP

        if attention_mask is not None:
            raise ParallelError("xDiT mode does not take a caller attention_mask")
        sp, ulysses, ring = self.layout["sp"], self.layout["ulysses"], self.layout["ring"]
        image = self.context.img_ids.shape[-2]  # recorded by CLEAR's hook before the wrapper splits the tokens
        image_local = image // sp
        text_local = query.shape[1] - image_local
        split_text = bool(get_runtime_state().split_text_embed_in_sp)
        text = text_local * sp if split_text else text_local
        if text_len is not None and text_len != text_local:
            raise ParallelError(f"{state.name}: {text_len} text tokens but {text_local} expected on this rank")
        config = state.config
        geometry = self.context.geometry(text)
        call = _Call(geometry, config, state.spatial_weight, config.softmax_scale(query.shape[-1], geometry.total_len),
                     self._blocks(geometry, text_local, image_local, split_text), self.layout["ring_rank"],
                     text_split=split_text)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        with record_function(ATTENTION_RANGE):
            self.stats.attention_calls += 1
            if ulysses > 1:  # q, k, v in and the output back
                self.stats.attention_bytes += all_to_all_bytes(4 * nbytes(q), ulysses)
            if ring > 1:  # torch's ring all-gathers each rank's K and V once
                self.stats.attention_bytes += all_gather_bytes(2 * nbytes(q), ring)
            with communication(f"{state.name}: xfuser sequence-parallel attention"):
                out = USP(q, k, v, backend=BACKEND, attention_kwargs={_KWARG: call}, combine_qkv_a2a=True)
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


@dataclass(eq=False)
class XDiTHandle(ParallelHandle):
    """What :func:`apply` changed; :meth:`remove` restores the single-process transformer (CLEAR stays)."""

    original_class: type | None = None

    @property
    def layout(self) -> dict:
        return dict(self.strategy.layout)

    def remove(self) -> None:
        super().remove()
        self.strategy.model.__class__ = self.original_class


def _import_xfuser():
    check_xfuser_version()
    try:
        import xfuser  # noqa: F401
    except Exception as exc:  # xfuser probes for an accelerator at import and raises non-ImportErrors on CPU
        raise ParallelError(f"xfuser {xfuser_version()} could not be imported here ({type(exc).__name__}: {exc}); "
                            "on a CPU-only machine it needs the test harness in tests/xfuser_cpu.py") from exc


def _initialize(pipe, engine_config) -> None:
    """Set up xfuser's process groups and runtime state from ``engine_config`` where not done yet."""
    from xfuser.core.distributed import (init_distributed_environment, initialize_model_parallel,
                                         initialize_runtime_state, model_parallel_is_initialized,
                                         runtime_state_is_initialized)

    if engine_config is None:
        if not (model_parallel_is_initialized() and runtime_state_is_initialized()):
            raise ParallelError("xfuser is not set up in this process: pass the EngineConfig from "
                                "xFuserArgs(...).create_config() to apply()")
        return
    parallel = engine_config.parallel_config
    if not model_parallel_is_initialized():
        # the backend of the group torchrun formed (gloo on CPU, nccl on GPUs): xfuser would pick by device
        backend = dist.get_backend()
        init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=backend)
        initialize_model_parallel(
            data_parallel_degree=parallel.dp_degree, classifier_free_guidance_degree=parallel.cfg_degree,
            sequence_parallel_degree=parallel.sp_degree, ulysses_degree=parallel.ulysses_degree,
            ring_degree=parallel.ring_degree, tensor_parallel_degree=parallel.tp_degree,
            pipeline_parallel_degree=parallel.pp_degree, fully_shard_degree=parallel.fs_degree, backend=backend)
    if not runtime_state_is_initialized():
        initialize_runtime_state(pipe, engine_config)


def _layout() -> dict:
    from xfuser.core.distributed import get_runtime_state, get_sp_group

    parallel = get_runtime_state().parallel_config
    unsupported = {name: getattr(parallel, name) for name in ("dp_degree", "cfg_degree", "pp_degree", "tp_degree",
                                                               "fs_degree") if getattr(parallel, name, 1) != 1}
    if unsupported:
        raise ParallelError(f"CLEAR runs inside xfuser's sequence parallelism only (ulysses_degree, ring_degree); "
                            f"these degrees must be 1: {unsupported}")
    if get_runtime_state().fp8_comms is not None:
        raise ParallelError("xfuser's FP8 communication is not supported with CLEAR")
    group = get_sp_group()
    layout = dict(sp=group.world_size, sp_rank=group.rank_in_group, ulysses=group.ulysses_world_size,
                  ulysses_rank=group.ulysses_rank, ring=group.ring_world_size, ring_rank=group.ring_rank)
    if layout["ulysses"] * layout["ring"] != layout["sp"] or \
            layout["sp_rank"] != layout["ring_rank"] * layout["ulysses"] + layout["ulysses_rank"]:
        raise ParallelError(f"unexpected xfuser sequence-parallel layout {layout}: CLEAR expects xfuser's "
                            "process groups (yunchang with use_ulysses_low); is HAS_LONG_CTX_ATTN false here?")
    if dist.get_world_size() != layout["sp"]:
        raise ParallelError(f"the sequence-parallel degree {layout['sp']} (ulysses x ring) must equal the number "
                            f"of processes ({dist.get_world_size()})")
    return layout


def apply(pipe, engine_config=None) -> XDiTHandle:
    """Run ``pipe``'s CLEAR transformer under xfuser's sequence parallelism (Ulysses, ring or both).

    Args:
        pipe: a FLUX pipeline (or its transformer) with CLEAR loaded (``clear_adapters.load``/``attach``),
            on this rank's device.
        engine_config: xfuser's ``EngineConfig`` (``xFuserArgs(...).create_config()[0]``); xfuser's process
            groups and runtime state are created from it with the backend of the current torch.distributed
            group unless they exist. ``None``: use the ones xfuser already set up.

    The transformer's class becomes xfuser's ``xFuserFlux1Transformer2DWrapper`` (weights, CLEAR and other
    plugins untouched) until :meth:`XDiTHandle.remove`. Raises :class:`ParallelError` before changing the
    pipeline when something is not supported.
    """
    _import_xfuser()
    from diffusers import FluxTransformer2DModel
    from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY
    from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

    model = getattr(pipe, "transformer", pipe)
    context = check_apply(pipe, model, "xDiT mode", "xdit")
    if not isinstance(model, FluxTransformer2DModel):
        raise ParallelError(f"xDiT mode needs a FLUX.1 pipeline or transformer; got {type(model).__name__}")
    # xfuser's runtime state reads the model through ``pipeline.transformer``
    _initialize(pipe if model is not pipe else types.SimpleNamespace(transformer=model), engine_config)
    layout = _layout()
    if model.config.num_attention_heads % layout["ulysses"]:
        raise ParallelError(f"{model.config.num_attention_heads} attention heads cannot be split over "
                            f"ulysses_degree {layout['ulysses']}")
    from clear_adapters.weights import attention_layers

    if layout["ring"] > 1 and any(getattr(a, "_clear_state", None) is not None and a._clear_state.config.down_factor
                                  > 1 for _, a in attention_layers(model)):
        raise ParallelError("ring attention cannot run CLEAR with down_factor > 1 (the pooled keys need the whole "
                            "image); use ulysses_degree instead of ring_degree, or halo mode")
    ATTENTION_FUNCTION_REGISTRY.setdefault(BACKEND, clear_usp_attention)  # stateless: all state comes per call
    strategy = XDiTParallel(model, layout)
    handle = XDiTHandle(strategy, original_class=type(model))
    # xfuser's runner builds this class from the checkpoint; here the loaded model becomes it in place (it adds
    # no state: token splitting and gathering only), so weights, CLEAR hooks and LoRA layers stay as they are
    if not isinstance(model, xFuserFlux1Transformer2DWrapper):
        model.__class__ = xFuserFlux1Transformer2DWrapper
    handle.hooks.append(model.register_forward_pre_hook(strategy.pre_forward, with_kwargs=True))
    context.sequence_parallel = strategy
    return handle
