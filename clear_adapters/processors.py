"""diffusers glue: CLEAR attention processors for ``FluxAttention`` and the per-model geometry hook.

How CLEAR stays installed while other tools swap processors:

* The CLEAR settings of a layer live on the attention module itself (``attn._clear_state``), not in
  the processor. diffusers re-creates processors with a no-argument constructor
  (``processor.__class__()`` in ``load_ip_adapter``/``unload_ip_adapter``); a no-argument
  ``ClearFluxAttnProcessor()`` therefore still finds everything it needs.
* A forward pre-hook on every attention module converts a stock ``FluxAttnProcessor`` or
  ``FluxIPAdapterAttnProcessor`` that someone put back into its CLEAR twin just before it runs, so
  CLEAR survives ``load_ip_adapter``/``unload_ip_adapter`` in any order. LoRA needs nothing: peft
  wraps the projections, which the processors call.
* A forward pre-hook on each FLUX model records its ``img_ids``; each processor derives the token
  :class:`~clear_adapters.geometry.Geometry` from them and from the text length of its own call
  (which differs between a union ControlNet and the transformer). Geometries are cached per model.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

from .config import ClearConfig
from .errors import ClearAdapterError, InvalidArgumentError
from .geometry import Geometry
from .kernels import clear_attention

GEOMETRY_CACHE_SIZE = 8


@dataclass(eq=False)
class ModelContext:
    """Per-model state of one installation: the current ``img_ids`` and an LRU of geometries."""

    img_ids: torch.Tensor | None = None
    geometries: OrderedDict = field(default_factory=OrderedDict)
    kernel_calls: int = 0
    down_factor: int = 1
    pixels_per_token: int | None = None  # of the pipeline, for messages in pixels
    #: Set by a multi-process runner (``clear_adapters.integrations.xdit`` / ``.halo``) while the model's
    #: tokens are split across processes: an object whose ``attention(attn, state, query, key, value,
    #: text_len, attention_mask)`` returns (B, N_local, H*D) for this process's tokens. None: one process.
    sequence_parallel: object | None = None
    _ids_key: tuple | None = None
    _grid_checked: tuple | None = None

    def set_ids(self, img_ids: torch.Tensor) -> None:
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        self.img_ids = img_ids
        self._ids_key = None
        if self.down_factor > 1:
            self._check_grid()

    def _key(self) -> tuple:
        if self._ids_key is None:
            ids = self.img_ids.detach().to("cpu")
            self._ids_key = (tuple(ids.shape), ids.to(torch.float64).numpy().tobytes())
        return self._ids_key

    def _check_grid(self) -> None:
        # Before the first attention layer runs: a grid the pooling cannot tile is the caller's image
        # size, and the message says which sizes work in this pipeline's own pixels per token.
        if self._grid_checked == self._key():
            return
        d, p = self.down_factor, self.pixels_per_token
        for g in Geometry.from_ids(self.img_ids, 0).grids or ():
            if g.height % d or g.width % d:
                size = f" ({g.height * p}x{g.width * p} px at {p} px per token)" if p else ""
                hint = f"multiples of {d * p} px" if p else f"sizes whose token grid divides by {d}"
                raise InvalidArgumentError(f"the image is a {g.height}x{g.width} tokens grid{size}, not divisible by "
                                           f"down_factor {d}; use heights and widths that are {hint}")
        self._grid_checked = self._key()

    def geometry(self, text_len: int) -> Geometry:
        if self.img_ids is None:
            raise ClearAdapterError("CLEAR attention ran before its model's forward recorded img_ids; call the "
                                    "model (transformer/ControlNet), not its attention layers, directly")
        key = (text_len, self._key())
        geometry = self.geometries.get(key)
        if geometry is None:
            geometry = Geometry.from_ids(self.img_ids, text_len)
            self.geometries[key] = geometry
            while len(self.geometries) > GEOMETRY_CACHE_SIZE:
                self.geometries.popitem(last=False)
        else:
            self.geometries.move_to_end(key)
        return geometry


@dataclass(eq=False)
class LayerState:
    """What one attention layer needs to run CLEAR: the pattern, its model's context, pooling weights."""

    config: ClearConfig
    context: ModelContext
    spatial_weight: torch.nn.Parameter | None = None
    name: str = ""


def _state(attn) -> LayerState:
    state = getattr(attn, "_clear_state", None)
    if state is None:
        raise ClearAdapterError("a CLEAR processor is attached to an attention layer without CLEAR state; "
                                "install CLEAR with clear_adapters.load()/attach() rather than by hand")
    return state


def _project(attn, hidden_states, encoder_hidden_states):
    """q, k, v (B, N, H, D) after RMS norms, text first when there is a text stream — as diffusers does."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    image_query = query
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
    return query, key, value, image_query


def _clear_core(attn, query, key, value, encoder_hidden_states, attention_mask, image_rotary_emb):
    """RoPE, then CLEAR attention on the joint sequence; returns (B, N, H*D)."""
    state = _state(attn)
    context = state.context
    if getattr(attn.processor, "_parallel_config", None) is not None and context.sequence_parallel is None:
        # diffusers' context parallelism split the sequence and expects the processor to run its ring/Ulysses
        # exchange; CLEAR would silently attend within one shard only
        raise ClearAdapterError(f"{state.name}: diffusers context parallelism (enable_parallelism) is not supported "
                                "by CLEAR; use clear_adapters.integrations.xdit (Ulysses, ring) or "
                                "clear_adapters.integrations.halo for multi-process inference")
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    if context.sequence_parallel is not None:
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        return context.sequence_parallel.attention(attn, state, query, key, value, text_len, attention_mask)
    n_img = context.img_ids.shape[-2] if context.img_ids is not None else 0
    text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else query.shape[1] - n_img
    geometry = context.geometry(text_len)
    context.kernel_calls += 1
    out = clear_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), geometry,
                          state.config, spatial_weight=state.spatial_weight, attention_mask=attention_mask)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _output_projections(attn, hidden_states: torch.Tensor, text_len: int):
    """Split the joint output into (image, text) and apply each stream's output projection."""
    text, image = hidden_states.split_with_sizes([text_len, hidden_states.shape[1] - text_len], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


class ClearFluxAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` that runs CLEAR attention (no constructor arguments)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        query, key, value, _ = _project(attn, hidden_states, encoder_hidden_states)
        hidden_states = _clear_core(attn, query, key, value, encoder_hidden_states, attention_mask,
                                    image_rotary_emb)
        if encoder_hidden_states is None:
            return hidden_states
        return _output_projections(attn, hidden_states, encoder_hidden_states.shape[1])


class ClearFluxIPAdapterAttnProcessor(FluxIPAdapterAttnProcessor):
    """diffusers' IP-Adapter processor with CLEAR for the joint attention; the IP branch is unchanged."""

    @classmethod
    def from_ip_processor(cls, processor: FluxIPAdapterAttnProcessor) -> "ClearFluxIPAdapterAttnProcessor":
        """A CLEAR twin sharing ``processor``'s IP projections and scales (no copy of weights)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.hidden_size = processor.hidden_size
        new.cross_attention_dim = processor.cross_attention_dim
        new.scale = processor.scale
        new.to_k_ip = processor.to_k_ip
        new.to_v_ip = processor.to_v_ip
        return new

    def to_stock(self) -> FluxIPAdapterAttnProcessor:
        stock = FluxIPAdapterAttnProcessor.__new__(FluxIPAdapterAttnProcessor)
        torch.nn.Module.__init__(stock)
        stock.hidden_size, stock.cross_attention_dim, stock.scale = self.hidden_size, self.cross_attention_dim, self.scale
        stock.to_k_ip, stock.to_v_ip = self.to_k_ip, self.to_v_ip
        return stock

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None, ip_hidden_states=None,
                 ip_adapter_masks=None):
        batch = hidden_states.shape[0]
        query, key, value, ip_query = _project(attn, hidden_states, encoder_hidden_states)
        hidden_states = _clear_core(attn, query, key, value, encoder_hidden_states, attention_mask,
                                    image_rotary_emb)
        if encoder_hidden_states is None:
            return hidden_states
        image, text = _output_projections(attn, hidden_states, encoder_hidden_states.shape[1])
        # The IP branch: image queries (no RoPE) against the projected image-prompt tokens, dense.
        ip_out = torch.zeros_like(image)
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states or [], self.scale, self.to_k_ip, self.to_v_ip):
            ip_key = to_k_ip(states).view(batch, -1, attn.heads, attn.head_dim).transpose(1, 2)
            ip_value = to_v_ip(states).view(batch, -1, attn.heads, attn.head_dim).transpose(1, 2)
            current = torch.nn.functional.scaled_dot_product_attention(ip_query.transpose(1, 2), ip_key, ip_value)
            ip_out += scale * current.transpose(1, 2).reshape(batch, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
        return image, text, ip_out


def clear_twin(processor):
    """The CLEAR processor standing in for a stock one, or None when ``processor`` is not stock FLUX."""
    if type(processor) is FluxAttnProcessor:
        return ClearFluxAttnProcessor()
    if type(processor) is FluxIPAdapterAttnProcessor:
        return ClearFluxIPAdapterAttnProcessor.from_ip_processor(processor)
    return None


def stock_twin(processor):
    """The stock diffusers processor equivalent to a CLEAR one (``processor`` itself otherwise)."""
    if isinstance(processor, ClearFluxIPAdapterAttnProcessor):
        return processor.to_stock()
    if isinstance(processor, ClearFluxAttnProcessor):
        return FluxAttnProcessor()
    return processor


def is_clear(processor) -> bool:
    return isinstance(processor, (ClearFluxAttnProcessor, ClearFluxIPAdapterAttnProcessor))


def _keep_clear_hook(attn, args, kwargs):
    # Runs before every attention forward: re-install CLEAR if a plugin put a stock processor back.
    if getattr(attn, "_clear_state", None) is not None and not is_clear(attn.processor):
        twin = clear_twin(attn.processor)
        if twin is None:
            raise ClearAdapterError(
                f"{attn._clear_state.name}: processor {type(attn.processor).__name__} replaced CLEAR and has no "
                "CLEAR equivalent; call clear_adapters.unload() before installing other attention processors")
        attn.set_processor(twin)
    return None


def _ids_hook_for(model):
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        img_ids = bound.arguments.get("img_ids")
        if img_ids is None:
            raise ClearAdapterError(f"{type(module).__name__} was called without img_ids; CLEAR needs the token "
                                    "positions to build its window")
        # read the context off the module (not a closure) so a deep copy of the model uses its own
        module._clear_context.set_ids(img_ids)
        return None

    return hook


@dataclass(eq=False)
class ModelInstallation:
    """What was attached to one model, so it can be taken off again exactly."""

    model: torch.nn.Module
    context: ModelContext
    original_processors: dict[str, object]
    installed_processors: dict[str, object]
    hooks: list = field(default_factory=list)


def check_attachable(model, model_name: str = "model") -> None:
    """Raise unless every FLUX attention layer of ``model`` can take CLEAR now (nothing is changed)."""
    from .weights import attention_layers

    if getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None) is not None:
        raise ClearAdapterError(f"{model_name} runs diffusers context parallelism (enable_parallelism), which CLEAR "
                                "does not support; use clear_adapters.integrations.xdit or .halo instead")
    for name, attn in attention_layers(model):
        if getattr(attn, "fused_projections", False):
            # the adapter's q/k/v would miss the fused to_qkv copy the processor reads
            raise ClearAdapterError(f"{model_name}.{name} has fused QKV projections; call "
                                    "unfuse_qkv_projections() on the model before loading CLEAR")
        if getattr(attn, "_clear_state", None) is not None:
            raise ClearAdapterError(f"{model_name}.{name} already has CLEAR installed; unload it first")
        if clear_twin(attn.processor) is None:
            raise ClearAdapterError(f"{model_name}.{name} runs {type(attn.processor).__name__}; CLEAR stands in "
                                    "only for diffusers' FluxAttnProcessor and FluxIPAdapterAttnProcessor")


def attach(model, config: ClearConfig, spatial_weights: dict[str, torch.Tensor] | None = None,
           layers: list[str] | None = None, pixels_per_token: int | None = None) -> ModelInstallation:
    """Install CLEAR processors and hooks on every FLUX attention layer of ``model`` (no weight changes).

    ``pixels_per_token`` (of the pipeline) lets errors about image sizes speak in pixels.
    Raises before changing anything if a layer runs a processor CLEAR cannot stand in for.
    """
    from .weights import attention_layers

    check_attachable(model)
    targets = [(n, a) for n, a in attention_layers(model) if layers is None or n in layers]
    context = ModelContext(down_factor=config.down_factor, pixels_per_token=pixels_per_token)
    install = ModelInstallation(model, context, {}, {})
    model._clear_context = context
    install.hooks.append(model.register_forward_pre_hook(_ids_hook_for(model), with_kwargs=True))
    try:
        for name, attn in targets:
            weight = None
            if spatial_weights is not None and name in spatial_weights:
                sw = spatial_weights[name]
                weight = torch.nn.Parameter(sw.detach().to(device=attn.to_q.weight.device, dtype=torch.float32))
            install.original_processors[name] = attn.processor
            attn._clear_state = LayerState(config, context, weight, name)
            twin = clear_twin(attn.processor)
            attn.set_processor(twin)
            install.installed_processors[name] = twin
            install.hooks.append(attn.register_forward_pre_hook(_keep_clear_hook, with_kwargs=True))
    except BaseException:
        detach(install)
        raise
    return install


def detach(install: ModelInstallation) -> None:
    """Undo :func:`attach`: hooks off, state removed, original (or stock-equivalent) processors back."""
    from .weights import attention_layers

    for handle in install.hooks:
        handle.remove()
    layers = dict(attention_layers(install.model))
    for name, original in install.original_processors.items():
        attn = layers.get(name)
        if attn is None:
            continue
        current = attn.processor
        # an IP twin may carry a scale set since (set_ip_adapter_scale): convert it rather than go back
        untouched = current is install.installed_processors.get(name) and \
            not isinstance(current, ClearFluxIPAdapterAttnProcessor)
        attn.set_processor(original if untouched else stock_twin(current))
        if hasattr(attn, "_clear_state"):
            del attn._clear_state
    if getattr(install.model, "_clear_context", None) is install.context:
        del install.model._clear_context


@contextmanager
def suspended(install: ModelInstallation):
    """Run ``install.model`` with its original attention for a while (e.g. as the teacher of distillation).

    Each layer's CLEAR state is set aside (so the keep-CLEAR hook leaves the stock processor alone) and
    the processor it replaced is put back; on exit CLEAR state and processors return as they were.
    """
    from .weights import attention_layers

    layers = dict(attention_layers(install.model))
    saved = []
    try:
        for name, original in install.original_processors.items():
            attn = layers[name]
            saved.append((attn, attn._clear_state, attn.processor))
            del attn._clear_state
            attn.set_processor(original)
        yield install.model
    finally:
        for attn, state, processor in reversed(saved):
            attn._clear_state = state
            attn.set_processor(processor)
