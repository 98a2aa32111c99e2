"""The public API: ``load`` an adapter into a FLUX pipeline, ``unload`` it, ``attach`` a bare pattern."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import processors, validate, weights
from .config import ClearConfig
from .errors import (AdapterNotFoundError, ClearAdapterError, IncompatibleModelError, InvalidAdapterError,
                     InvalidArgumentError)
from .geometry import Geometry
from .registry import RegistryEntry, is_registry_name, lookup

logger = logging.getLogger("clear_adapters")

CONFIG_NAME = "clear_config.json"


@dataclass
class AdapterSpec:
    """Where an adapter's weights are and the attention pattern they need."""

    source: str
    config: ClearConfig
    weights_path: Path | None = None  # local file, once resolved
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    base_model: str | None = None
    registry_entry: RegistryEntry | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(eq=False)
class ClearHandle:
    """What :func:`load` installed: the spec, the models it changed and what it replaced there."""

    spec: AdapterSpec
    targets: list[str]
    replaced: dict[str, list[str]]
    pixels_per_token: int
    _installs: list = field(default_factory=list, repr=False)
    _applied: list = field(default_factory=list, repr=False)
    _models: list = field(default_factory=list, repr=False)
    _layer_counts: dict = field(default_factory=dict, repr=False)
    _head_shape: tuple[int, int] = (0, 0)
    active: bool = True

    @property
    def config(self) -> ClearConfig:
        return self.spec.config

    _final_kernel_calls: int = 0

    @property
    def kernel_calls(self) -> int:
        """CLEAR attention calls run so far in every target model (a cheap "is it active" probe)."""
        if not self.active:
            return self._final_kernel_calls
        return sum(install.context.kernel_calls for install in self._installs)

    def attention_flops(self, height: int, width: int, text_len: int = 512) -> dict:
        """Attention FLOPs per denoising step at ``height x width`` pixels, full attention vs CLEAR.

        Counts every attention layer of the transformer (4 FLOPs per allowed query-key pair and
        channel, as the paper does). Returns tokens, per-layer and total FLOPs and the CLEAR fraction.
        """
        p = self.pixels_per_token * self.config.down_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % p:
                raise InvalidArgumentError(f"{name} must be a positive multiple of {p} px for this pipeline and "
                                           f"down factor, got {value!r}")
        geometry = Geometry.from_grid(height // p, width // p, text_len)
        heads, head_dim = self._head_shape
        full = geometry.attention_flops(head_dim, heads)
        clear = geometry.attention_flops(head_dim, heads, self.config)
        layers = self._layer_counts.get("transformer", 0)
        return {"tokens": geometry.total_len, "image_tokens": geometry.image_len, "layers": layers,
                "full_per_layer": full, "clear_per_layer": clear, "full_total": full * layers,
                "clear_total": clear * layers, "fraction": clear / full}


# ---------------------------------------------------------------------------------------------- resolve
def resolve(source: str | Path, *, window_size: float | None = None, down_factor: int | None = None,
            revision: str | None = None, token=None, proportional_attention: bool | None = None,
            backend: str = "auto", download: bool = True) -> AdapterSpec:
    """Turn a registry name, a local file/directory or a Hub repo id into an :class:`AdapterSpec`.

    With ``download`` the weights are fetched (Hub cache) and ``spec.weights_path`` is set.
    """
    validate.check_arguments(window_size=window_size, down_factor=down_factor,
                             proportional_attention=proportional_attention, backend=backend, revision=revision)
    source_str = validate.check_source(source)
    path = Path(source_str).expanduser()
    if is_registry_name(source_str):
        entry = lookup(source_str)
        config = _make_config(entry.window_size, entry.down_factor, window_size, down_factor,
                              bool(proportional_attention), backend, source_str)
        spec = AdapterSpec(source_str, config, repo_id=entry.repo_id, filename=entry.filename,
                           revision=revision or entry.revision, sha256=entry.sha256, base_model=entry.base_model,
                           registry_entry=entry)
    elif validate.path_exists(path):
        spec = _resolve_local(path, window_size, down_factor, proportional_attention, backend)
    elif path.suffix.lower() in weights.PICKLE_SUFFIXES:
        weights.check_safetensors_path(path)  # raises UnsafeFormatError before "not found"
        raise AdapterNotFoundError(validate.shown(path))
    elif source_str.endswith((".safetensors", ".json")) or source_str.startswith(("/", ".", "~")) \
            or source_str.count("/") > 1:
        raise AdapterNotFoundError(f"no such file or directory: {validate.shown(path)}")
    elif source_str.count("/") == 1 and not _looks_like_registry(source_str):
        validate.check_repo_id(source_str)  # "owner/.." and friends: an argument error, not a Hub request
        spec = _resolve_repo(source_str, window_size, down_factor, revision, token, proportional_attention, backend)
    else:
        if len(source_str) > 255:  # no registry name is this long; do not echo it whole
            raise AdapterNotFoundError(f"no adapter, file or Hub repo named {validate.shown(source_str)!r}")
        lookup(source_str)  # raises AdapterNotFoundError with the closest names
        raise AssertionError("unreachable")
    if download and spec.weights_path is None and spec.repo_id is not None:
        from .hub import download as hub_download

        spec.weights_path = hub_download(spec.repo_id, spec.filename, revision=spec.revision, token=token,
                                         sha256=spec.sha256)
    elif spec.weights_path is not None and spec.sha256:
        from .hub import verify_sha256

        verify_sha256(spec.weights_path, spec.sha256)
    return spec


def _looks_like_registry(name: str) -> bool:
    from .registry import list_adapters

    return name.split("/")[0] in {e.name.split("/")[0] for e in list_adapters()}


def _make_config(known_window, known_down, window_size, down_factor, proportional, backend, what) -> ClearConfig:
    if window_size is not None and known_window is not None and float(window_size) != float(known_window):
        logger.warning("%s was trained with window_size=%s; using window_size=%s as requested", what,
                       known_window, window_size)
    if down_factor is not None and known_down is not None and down_factor != known_down:
        raise IncompatibleModelError(f"{what} was trained with down_factor={known_down}; its pooling weights "
                                     f"do not fit down_factor={down_factor}")
    window = window_size if window_size is not None else known_window
    if window is None:
        raise ClearAdapterError(f"{what} does not say which window it was trained with; pass window_size=")
    down = down_factor if down_factor is not None else (known_down or 1)
    return ClearConfig(window, down, proportional_attention=proportional, backend=backend)


def _choose(explicit, recorded):
    """The caller's setting when given, else what the adapter recorded (both validated as booleans)."""
    return bool(recorded) if explicit is None else explicit


def _read_config_file(path: Path) -> dict:
    from .artifact import read_config

    return read_config(path)


def _resolve_local(path: Path, window_size, down_factor, proportional, backend) -> AdapterSpec:
    config_data: dict = {}
    if path.is_dir():
        if validate.path_exists(path / CONFIG_NAME) and not (path / CONFIG_NAME).is_file():
            raise InvalidAdapterError(f"{path / CONFIG_NAME} is not a regular file; an adapter directory's "
                                      f"{CONFIG_NAME} is a JSON file")
        if (path / CONFIG_NAME).is_file():
            config_data = _read_config_file(path / CONFIG_NAME)
            weights_file = path / config_data["weights"]
            if not validate.path_exists(weights_file):
                raise AdapterNotFoundError(f"{path / CONFIG_NAME} names {config_data['weights']}, which is not in "
                                           f"{path}")
        else:
            candidates = sorted(path.glob("*.safetensors"))
            pickles = [p for p in path.iterdir() if p.suffix.lower() in weights.PICKLE_SUFFIXES]
            if not candidates and pickles:
                weights.check_safetensors_path(pickles[0])
            if len(candidates) != 1:
                raise AdapterNotFoundError(f"{path}: expected {CONFIG_NAME} or exactly one .safetensors file, "
                                           f"found {len(candidates)}")
            weights_file = candidates[0]
    else:
        weights_file = path
    header = _safetensors_metadata(weights_file)
    known_window = config_data.get("window_size")
    known_down = config_data.get("down_factor")
    header_window, header_down = validate.header_pattern(
        header, weights_file.name, window_size=window_size if known_window is None else known_window,
        down_factor=down_factor if known_down is None else known_down)
    known_window = header_window if known_window is None else known_window
    known_down = header_down if known_down is None else known_down
    config = _make_config(known_window, known_down, window_size, down_factor,
                          _choose(proportional, config_data.get("proportional_attention", False)), backend,
                          str(path))
    return AdapterSpec(str(path), config, weights_path=weights_file, sha256=config_data.get("sha256"),
                       base_model=config_data.get("base_model"), metadata=config_data)


def _resolve_repo(repo_id, window_size, down_factor, revision, token, proportional, backend) -> AdapterSpec:
    from .hub import commit_of
    from .hub import download as hub_download

    config_path = hub_download(repo_id, CONFIG_NAME, revision=revision, token=token)
    # Pin the weights to the commit the config came from: a push landing between the two downloads
    # must not pair this config with another commit's weights. Works offline too (cache layout).
    commit = commit_of(config_path, CONFIG_NAME) or revision
    config_data = _read_config_file(config_path)
    config = _make_config(config_data.get("window_size"), config_data.get("down_factor"), window_size, down_factor,
                          _choose(proportional, config_data.get("proportional_attention", False)), backend,
                          repo_id)
    return AdapterSpec(repo_id, config, repo_id=repo_id, filename=config_data["weights"], revision=commit,
                       sha256=config_data.get("sha256"), base_model=config_data.get("base_model"),
                       metadata=config_data)


def _safetensors_metadata(path: Path) -> dict:
    # the validated header (no tensor is read): a broken file is an IntegrityError naming it
    return dict(weights.safetensors_header(path).get("__metadata__", {}))


# ---------------------------------------------------------------------------------------------- targets
def flux_models(pipe, *, controlnet: bool = True) -> list[tuple[str, torch.nn.Module]]:
    """(name, model) of every FLUX-attention model in ``pipe`` (or ``pipe`` itself if it is a model)."""
    if isinstance(pipe, torch.nn.Module):
        pipe = getattr(pipe, "_orig_mod", pipe)  # torch.compile wrapper: install on the real module
        if not weights.attention_layers(pipe):
            raise IncompatibleModelError(f"{type(pipe).__name__} has no FLUX attention layers")
        return [("transformer", pipe)]
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise IncompatibleModelError(f"{type(pipe).__name__} is neither a diffusers pipeline nor a model")
    transformer = components.get("transformer")
    transformer = getattr(transformer, "_orig_mod", transformer)
    if transformer is None or not weights.attention_layers(transformer):
        kind = type(transformer).__name__ if transformer is not None else "none"
        raise IncompatibleModelError(
            f"{type(pipe).__name__} has no FLUX transformer (transformer: {kind}); CLEAR adapters fit "
            "FLUX-family pipelines (FluxPipeline, FluxControlNetPipeline, FluxKontextPipeline, ...)")
    found = [("transformer", transformer)]
    net = components.get("controlnet")
    if controlnet and net is not None:
        net = getattr(net, "_orig_mod", net)
        nets = [getattr(n, "_orig_mod", n) for n in net.nets] if hasattr(net, "nets") else [net]
        for i, model in enumerate(nets):
            if any(model is m for _, m in found):  # one net used in two slots is converted once
                continue
            if weights.attention_layers(model):
                found.append(("controlnet" if len(nets) == 1 and not hasattr(net, "nets") else f"controlnet.nets.{i}",
                              model))
    return found


def _pixels_per_token(pipe) -> int:
    return int(getattr(pipe, "vae_scale_factor", 8)) * 2 if not isinstance(pipe, torch.nn.Module) else 16


def _head_shape(model) -> tuple[int, int]:
    _, attn = weights.attention_layers(model)[0]
    return attn.heads, attn.head_dim


# ---------------------------------------------------------------------------------------------- load/unload
def load(source: str | Path, pipe, *, window_size: float | None = None, down_factor: int | None = None,
         revision: str | None = None, token=None, backend: str = "auto", proportional_attention: bool | None = None,
         controlnet: bool = True, weight_mode: str | None = None, base=None) -> ClearHandle:
    """Install a CLEAR adapter into a FLUX pipeline (or a FLUX transformer); returns a :class:`ClearHandle`.

    Args:
        source: a registry name (``"flux-dev"``, ``"flux-dev/r8"``, see ``list_adapters()``), a local
            ``.safetensors`` file or adapter directory, or a Hub repo id (``"owner/name"``).
        pipe: a diffusers FLUX pipeline (its transformer and ControlNets get CLEAR) or a FLUX model.
        window_size, down_factor: the pattern, for files that do not record it.
        revision, token: Hub revision pin and credentials.
        backend: ``"auto"`` (tiled on CPU, flex on CUDA), ``"dense"``, ``"tiled"`` or ``"flex"``.
        proportional_attention: the authors' high-resolution logit scale (default: as the adapter
            records it, else off).
        controlnet: also convert ControlNets (their projections get the adapter's change w.r.t. the
            transformer, i.e. ``W_controlnet + (W_clear - W_transformer)``); ``False`` leaves them dense.
        weight_mode: ``"replace"`` writes the adapter's projections (what the paper did); ``"delta"``
            writes ``W_model + (W_clear - W_base)``, for fine-tuned variants of the adapter's base model.
            Default: the adapter's ``clear_config.json`` ``weight_mode``, else ``"replace"``.
        base: for ``"delta"``: the base model's attention tensors — a state dict, a local diffusers
            model directory, or a Hub model id (default: the adapter's ``base_model``); only the
            tensors the adapter touches are read.

    Everything is validated before the pipeline is touched; on error (or Ctrl-C) it is left unchanged.
    """
    validate.check_arguments(window_size=window_size, down_factor=down_factor,
                             proportional_attention=proportional_attention, backend=backend, weight_mode=weight_mode,
                             controlnet=controlnet, revision=revision)
    targets = flux_models(pipe, controlnet=controlnet)
    _refuse_double_install(targets)
    spec = resolve(source, window_size=window_size, down_factor=down_factor, revision=revision, token=token,
                   proportional_attention=proportional_attention, backend=backend)
    state_dict, header = weights.read_adapter_file(spec.weights_path)
    _check_config_layers(spec, state_dict)
    spec.metadata = {**header, **spec.metadata}
    file_down = weights.infer_down_factor(state_dict) or 1
    if file_down != spec.config.down_factor:
        raise IncompatibleModelError(f"{spec.weights_path.name} holds pooling weights for down_factor={file_down} "
                                     f"but the adapter is configured with down_factor={spec.config.down_factor}")
    if weight_mode is None:
        weight_mode = spec.metadata.get("weight_mode", "replace")
        if weight_mode not in validate.WEIGHT_MODES:  # from the file's header (the config is validated)
            raise InvalidAdapterError(f"{spec.weights_path.name}: its header says weight_mode={weight_mode!r}; "
                                      f"expected one of {validate.WEIGHT_MODES}")
    transformer = targets[0][1]
    base_tensors = None
    if weight_mode == "delta":
        from .base_weights import load_base_tensors

        source_of_base = base if base is not None else spec.base_model
        if source_of_base is None:
            raise ClearAdapterError("weight_mode='delta' needs the base model's weights: pass base=")
        needed = [k for k in weights.normalize_keys(state_dict) if not k.endswith(weights.SPATIAL_WEIGHT)]
        base_tensors = load_base_tensors(source_of_base, needed, token=token)
    plans = [("transformer", transformer, weights.plan(transformer, state_dict, spec.config.down_factor,
                                                       base=base_tensors))]
    # ControlNets were initialised from the base transformer: they get the adapter's change relative to
    # it. Only the tensors of the layers a ControlNet has are copied (a full FLUX copy would be 7 GB).
    # The transformer's own weights are that base, less any LoRA fused into them (which plan() re-adds
    # on top of the adapter for the transformer, and which the ControlNet never had).
    adapter_tensors = weights.normalize_keys(state_dict)
    current = {name: (p, new) for name, p, new in plans[0][2].writes}
    for name, model in targets[1:]:
        layers = [n for n, _ in weights.attention_layers(model)]
        base = base_tensors if base_tensors is not None else {
            key: p.detach().float().cpu() - (new.float() - adapter_tensors[key].float())
            for key, (p, new) in current.items() if key.rsplit(".attn.", 1)[0] + ".attn" in layers}
        plans.append((name, model, weights.plan(model, state_dict, spec.config.down_factor, model_name=name,
                                                layers=layers, base=base)))
    for name, model, _ in plans:
        processors.check_attachable(model, name)
    handle = ClearHandle(spec, [n for n, _, _ in plans], {}, _pixels_per_token(pipe))
    handle._head_shape = _head_shape(transformer)
    try:
        for name, model, weight_plan in plans:
            handle._models.append(model)
            applied = weights.AppliedWeights([])
            handle._applied.append(applied)  # before writing: an interrupt at any point is undone
            weights.apply(weight_plan, applied)
            handle._installs.append(processors.attach(model, spec.config, weight_plan.spatial,
                                                      pixels_per_token=handle.pixels_per_token))
            handle.replaced[name] = [n for n, _, _ in weight_plan.writes]
            handle._layer_counts[name] = len(weights.attention_layers(model))
            model._clear_handle = handle
    except BaseException:  # Ctrl-C included: nothing may stay half-installed
        _undo(handle)
        raise
    logger.info("CLEAR %s installed on %s (window %s, down factor %s)", spec.source, ", ".join(handle.targets),
                spec.config.window_size, spec.config.down_factor)
    return handle


def attach(pipe, window_size: float, *, down_factor: int = 1, backend: str = "auto",
           proportional_attention: bool = False, controlnet: bool = True) -> ClearHandle:
    """Install the CLEAR attention pattern without changing any weight (pooling weights start at 1/d^2).

    Useful to study the pattern itself, as the starting point of distillation, and for the exactness
    check: with a window covering the whole image it reproduces full attention.
    """
    config = ClearConfig(window_size, down_factor, proportional_attention=proportional_attention, backend=backend)
    validate.check_arguments(controlnet=controlnet)
    targets = flux_models(pipe, controlnet=controlnet)
    _refuse_double_install(targets)
    for name, model in targets:
        processors.check_attachable(model, name)
    spec = AdapterSpec(f"pattern(window_size={window_size}, down_factor={down_factor})", config)
    handle = ClearHandle(spec, [n for n, _ in targets], {}, _pixels_per_token(pipe))
    handle._head_shape = _head_shape(targets[0][1])
    d = down_factor
    try:
        for name, model in targets:
            layer_names = [n for n, _ in weights.attention_layers(model)]
            spatial = {n: torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d)) for n in layer_names} if d > 1 else None
            handle._models.append(model)
            handle._installs.append(processors.attach(model, config, spatial, pixels_per_token=handle.pixels_per_token))
            handle.replaced[name] = []
            handle._layer_counts[name] = len(weights.attention_layers(model))
            model._clear_handle = handle
    except BaseException:  # an error (or Ctrl-C) on the second model must not leave the first converted
        _undo(handle)
        raise
    return handle


def _check_config_layers(spec: AdapterSpec, state_dict) -> None:
    """A clear_config.json's layer list (and pattern) must describe the weights file it names."""
    if "layers" not in spec.metadata or "format_version" not in spec.metadata:
        return  # no config (a bare file or a registry entry): plan() checks the file against the model
    from .artifact import check_layout

    shapes = {key: tuple(t.shape) for key, t in weights.normalize_keys(state_dict).items()}
    check_layout(spec.metadata, shapes, {}, spec.weights_path.name)


def _refuse_double_install(targets) -> None:
    for name, model in targets:
        if getattr(model, "_clear_handle", None) is not None:
            raise ClearAdapterError(f"{name} already has CLEAR ({model._clear_handle.spec.source}); "
                                    "call clear_adapters.unload(pipe) first")


def _undo(handle: ClearHandle) -> None:
    for install in reversed(handle._installs):
        processors.detach(install)
    changed = 0
    for applied in reversed(handle._applied):
        changed += weights.restore(applied)
    for model in handle._models:
        if getattr(model, "_clear_handle", None) is handle:
            del model._clear_handle
        for _, attn in weights.attention_layers(model):
            if getattr(attn, "fused_projections", False):  # fused after loading: rebuild from restored q/k/v
                attn.unfuse_projections()
                attn.fuse_projections()
    if changed:
        logger.info("unload kept changes made to %d tensors after loading (a LoRA fused, a dtype change)", changed)
    # drop every reference to the models and the saved weights: a kept handle must not pin gigabytes
    handle._final_kernel_calls = handle.kernel_calls
    handle._installs.clear()
    handle._applied.clear()
    handle._models.clear()
    handle.active = False


def unload(pipe) -> list[ClearHandle]:
    """Remove CLEAR from ``pipe``: original weights (bit-exact) and processors back. Returns what was removed."""
    if isinstance(pipe, torch.nn.Module):
        models = [pipe]
    else:
        models = [m for _, m in flux_models(pipe, controlnet=True)]
    handles = []
    for model in models:
        handle = getattr(model, "_clear_handle", None)
        if handle is not None and handle not in handles:
            handles.append(handle)
    if not handles:
        raise ClearAdapterError(f"{type(pipe).__name__} has no CLEAR adapter installed")
    for handle in handles:
        _undo(handle)
    return handles


def get_handle(pipe) -> ClearHandle | None:
    """The handle of the CLEAR adapter installed in ``pipe``, if any."""
    models = [pipe] if isinstance(pipe, torch.nn.Module) else [m for _, m in flux_models(pipe)]
    for model in models:
        handle = getattr(model, "_clear_handle", None)
        if handle is not None:
            return handle
    return None


def describe(name: str, *, revision: str | None = None, token=None) -> dict:
    """What the registry knows about ``name`` (or the ``clear_config.json`` of a local adapter/Hub repo).

    For a Hub repo only ``clear_config.json`` is fetched (at ``revision``); ``revision`` in the
    result is the commit it came from.
    """
    if is_registry_name(name):
        return lookup(name).describe()
    spec = resolve(name, revision=revision, token=token, download=False)
    layers = spec.metadata.get("layers")
    return {"source": spec.source, "window_size": spec.config.window_size, "down_factor": spec.config.down_factor,
            "base_model": spec.base_model, "repo_id": spec.repo_id, "revision": spec.revision,
            "weights": spec.filename or (str(spec.weights_path) if spec.weights_path else None),
            **({"layer_count": len(layers)} if isinstance(layers, list) else {}),
            **{k: v for k, v in spec.metadata.items()
               if isinstance(v, (str, int, float, bool)) and k not in ("window_size", "down_factor", "base_model")}}


