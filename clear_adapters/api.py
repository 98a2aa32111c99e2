"""The public API: ``load`` an adapter into a FLUX pipeline, ``unload`` it, ``attach`` a bare pattern."""

from __future__ import annotations

import functools
import logging
import numbers
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import processors, validate, weights
from .config import ClearConfig
from .errors import (AdapterNotFoundError, ClearAdapterError, ClearPersistenceWarning, IncompatibleModelError,
                     InvalidAdapterError, InvalidArgumentError)
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
    #: False for a raw weights file whose down factor nobody stated: load() reads it off the pooling weights
    down_factor_recorded: bool = True


@dataclass(eq=False)
class ClearHandle:
    """What :func:`load` installed: the spec, the models it changed and what it replaced there."""

    spec: AdapterSpec
    targets: list[str]
    replaced: dict[str, list[str]]
    #: image pixels per latent token (16 for FLUX.1 pipelines); None for a bare model, which cannot know it
    pixels_per_token: int | None
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

    def __repr__(self) -> str:
        config = self.spec.config
        pattern = f"window_size={config.window_size:g}" + (f", down_factor={config.down_factor}"
                                                            if config.down_factor > 1 else "")
        state = "" if self.active else ", unloaded"
        return f"ClearHandle({self.spec.source!r}, {pattern}, targets={self.targets}{state})"

    def attention_flops(self, height: int, width: int, text_len: int = 512, *,
                        pixels_per_token: int | None = None) -> dict:
        """Attention FLOPs per denoising step at ``height x width`` pixels, full attention vs CLEAR.

        Counts every attention layer of the transformer (4 FLOPs per allowed query-key pair and
        channel, as the paper does). Returns tokens, per-layer and total FLOPs and the CLEAR fraction.
        ``pixels_per_token`` defaults to the pipeline's (VAE scale factor x 2); CLEAR installed on a
        bare model does not know its VAE, so it must be given then.
        """
        p = pixels_per_token or self.pixels_per_token
        if p is None:
            raise InvalidArgumentError(
                "CLEAR was installed on a bare model, which does not know how many image pixels one token covers; "
                "pass pixels_per_token= (16 for FLUX.1: VAE factor 8 x 2x2 patches)")
        step = p * self.config.down_factor  # the pooled branch tiles the grid in d x d blocks
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % step:
                raise InvalidArgumentError(f"{name} must be a positive multiple of {step} px for this pipeline and "
                                           f"down factor, got {value!r}")
        geometry = Geometry.from_grid(height // p, width // p, text_len)
        heads, head_dim = self._head_shape
        full = geometry.attention_flops(head_dim, heads)
        clear = geometry.attention_flops(head_dim, heads, self.config)
        layers = self._layer_counts.get("transformer", 0)
        return {"tokens": geometry.total_len, "image_tokens": geometry.image_len, "layers": layers,
                "full_per_layer": full, "clear_per_layer": clear, "full_total": full * layers,
                "clear_total": clear * layers, "fraction": clear / full}

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> Path:
        """peft-style alias of :func:`clear_adapters.save_adapter` (``save_adapter(handle, save_directory)``)."""
        from .artifact import save_adapter

        return save_adapter(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, *, base_model: str | None = None, trained_resolution=None, provenance=None,
                    **push_kwargs):
        """peft-style: save this adapter (:meth:`save_pretrained`) to a temporary folder and
        :func:`clear_adapters.push` it to ``repo_id``; ``push_kwargs`` are ``push``'s (revision, token, ...)."""
        import tempfile

        from .publish import push

        with tempfile.TemporaryDirectory(prefix="clear-adapter-") as folder:
            self.save_pretrained(folder, base_model=base_model, trained_resolution=trained_resolution,
                                 provenance=provenance)
            return push(folder, repo_id, **push_kwargs)


# ---------------------------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class HubOptions:
    """How one call reaches the Hub: the options diffusers loaders take, with the same meaning."""

    token: Any = None
    cache_dir: str | Path | None = None
    local_files_only: bool = False
    force_download: bool = False

    def download(self, repo_id: str, filename: str, revision: str | None, sha256: str | None = None, *,
                 missing_ok: bool = False) -> Path | None:
        from .hub import download

        return download(repo_id, filename, revision=revision, token=self.token, sha256=sha256,
                        cache_dir=self.cache_dir, local_files_only=self.local_files_only,
                        force_download=self.force_download, missing_ok=missing_ok)


def resolve(source: str | Path, *, window_size: float | None = None, down_factor: int | None = None,
            weight_name: str | None = None, subfolder: str | None = None, revision: str | None = None, token=None,
            cache_dir: str | Path | None = None, local_files_only: bool = False, force_download: bool = False,
            proportional_attention: bool | None = None, backend: str = "auto", download: bool = True) -> AdapterSpec:
    """Turn a registry name, a local file/directory or a Hub repo (or file) into an :class:`AdapterSpec`.

    ``source`` forms and the diffusers-style options are those of :func:`load`. With ``download`` the
    weights are fetched (Hub cache) and ``spec.weights_path`` is set.
    """
    return _resolve(source, window_size, down_factor, weight_name, subfolder, revision,
                    HubOptions(token, cache_dir, local_files_only, force_download), proportional_attention, backend,
                    download, require_pattern=True)


def _resolve(source, window_size, down_factor, weight_name, subfolder, revision, hub: HubOptions, proportional,
             backend, download, *, require_pattern: bool) -> AdapterSpec:
    validate.check_arguments(window_size=window_size, down_factor=down_factor,
                             proportional_attention=proportional, backend=backend, revision=revision)
    source_str = validate.check_source(source)
    weight_name, subfolder = _check_file_options(weight_name, subfolder)
    path = Path(source_str).expanduser()
    pattern = (window_size, down_factor, proportional, backend, require_pattern)
    if is_registry_name(source_str):
        entry = lookup(source_str)
        if weight_name or subfolder:
            raise ClearAdapterError(f"{source_str!r} is a registry name and already names its file "
                                    f"({entry.source}); to load another file pass the repo id or path with "
                                    "weight_name=...")
        if entry.path:  # shipped inside the package (the toy's adapters): a local source with a name
            local = entry.local_path()
            if not local.exists():
                raise AdapterNotFoundError(f"{source_str}: the packaged adapter {local} is missing; reinstall "
                                           "clear-adapters (or rebuild the toy: python examples/toy/train.py)")
            spec = _resolve_local(local, None, None, window_size, down_factor, proportional, backend,
                                  require_pattern)
            spec.source, spec.registry_entry = source_str, entry
            spec.base_model = entry.base_model
            spec.sha256 = spec.sha256 or entry.sha256
        else:
            config = _make_config(entry.window_size, entry.down_factor, window_size, down_factor, bool(proportional),
                                  backend, source_str)
            spec = AdapterSpec(source_str, config, repo_id=entry.repo_id, filename=entry.filename,
                               revision=revision or entry.revision, sha256=entry.sha256, base_model=entry.base_model,
                               registry_entry=entry)
    elif validate.path_exists(path):
        spec = _resolve_local(path, weight_name, subfolder, *pattern)
    elif path.suffix.lower() in weights.PICKLE_SUFFIXES:
        weights.check_safetensors_path(path)  # raises UnsafeFormatError before "not found"
        raise AdapterNotFoundError(validate.shown(path))
    elif source_str.startswith(("/", ".", "~")) or source_str.endswith(".json") \
            or (source_str.endswith(".safetensors") and source_str.count("/") < 2):  # not owner/name/file
        raise AdapterNotFoundError(f"no such file or directory: {validate.shown(path)}")
    elif _HUB_FILE.match(source_str):  # owner/name/[folder/]file.safetensors, as diffusers loaders accept
        if weight_name or subfolder:
            raise ClearAdapterError(f"{source_str!r} already names a file in a Hub repo; pass either "
                                    "'owner/name/file.safetensors' or 'owner/name' with weight_name=/subfolder=")
        owner, name, rest = source_str.split("/", 2)
        validate.check_repo_id(f"{owner}/{name}")
        folder, _, file_name = rest.rpartition("/")
        try:
            spec = _resolve_repo(f"{owner}/{name}", file_name, folder or None, revision, hub, *pattern, download)
        except AdapterNotFoundError as exc:
            raise AdapterNotFoundError(f"no local file {source_str}, and on the Hub: {exc}") from None
    elif source_str.count("/") == 1 and not _looks_like_registry(source_str):
        validate.check_repo_id(source_str)  # "owner/.." and friends: an argument error, not a Hub request
        spec = _resolve_repo(source_str, weight_name, subfolder, revision, hub, *pattern, download)
    elif source_str.endswith(".safetensors") or source_str.count("/") > 1:
        raise AdapterNotFoundError(f"no such file or directory: {validate.shown(path)}")
    else:
        if len(source_str) > 255:  # no registry name is this long; do not echo it whole
            raise AdapterNotFoundError(f"no adapter, file or Hub repo named {validate.shown(source_str)!r}")
        lookup(source_str)  # raises AdapterNotFoundError with the closest names
        raise AssertionError("unreachable")
    if download and spec.weights_path is None and spec.repo_id is not None:
        spec.weights_path = hub.download(spec.repo_id, spec.filename, spec.revision, spec.sha256)
    elif download and spec.weights_path is not None and spec.sha256 and spec.repo_id is None:
        from .hub import verify_sha256

        verify_sha256(spec.weights_path, spec.sha256)
    return spec


_HUB_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/(?:[\w.-]+/)*[\w.-]+\.safetensors$")


def _check_file_options(weight_name, subfolder) -> tuple[str | None, str | None]:
    """``weight_name`` must be a file name; ``subfolder`` a relative folder inside the repo/directory."""
    if weight_name is not None:
        if not isinstance(weight_name, str) or not weight_name or "/" in weight_name or "\\" in weight_name \
                or weight_name in (".", ".."):
            raise ValueError(f"weight_name must be a file name (use subfolder= for folders), got {weight_name!r}")
        if Path(weight_name).suffix.lower() in weights.PICKLE_SUFFIXES:
            weights.check_safetensors_path(Path(weight_name))  # UnsafeFormatError: never fetched, never unpickled
    if subfolder is not None:
        parts = str(subfolder).replace("\\", "/").strip("/").split("/")
        if not isinstance(subfolder, str) or str(subfolder).startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"subfolder must be a relative folder inside the repo or directory, got {subfolder!r}")
        subfolder = "/".join(parts)
    return weight_name, subfolder or None


def _in_folder(subfolder: str | None, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def _looks_like_registry(name: str) -> bool:
    from .registry import list_adapters

    return name.split("/")[0] in {e.name.split("/")[0] for e in list_adapters()}


def _make_config(known_window, known_down, window_size, down_factor, proportional, backend, what,
                 required: bool = True) -> ClearConfig | None:
    if window_size is not None and known_window is not None and float(window_size) != float(known_window):
        logger.warning("%s was trained with window_size=%s; using window_size=%s as requested", what,
                       known_window, window_size)
    if down_factor is not None and known_down is not None and down_factor != known_down:
        raise IncompatibleModelError(f"{what} was trained with down_factor={known_down}; its pooling weights "
                                     f"do not fit down_factor={down_factor}")
    window = window_size if window_size is not None else known_window
    if window is None:
        if not required:
            return None
        raise ClearAdapterError(f"{what} does not say which window it was trained with (no clear_config.json, no "
                                "window_size in its safetensors header); pass window_size= (and down_factor= "
                                "for pooled variants)")
    down = down_factor if down_factor is not None else (known_down or 1)
    return ClearConfig(window, down, proportional_attention=proportional, backend=backend)


def _choose(explicit, recorded):
    """The caller's setting when given, else what the adapter recorded (both validated as booleans)."""
    return bool(recorded) if explicit is None else explicit


def _read_config_file(path: Path) -> dict:
    from .artifact import read_config

    return read_config(path)


def _pattern_in_header(header: dict, where: str, window_size=None, down_factor=None) -> tuple:
    """(window_size, down_factor) recorded in a safetensors ``__metadata__`` header (None when absent).

    An unreadable recorded value is an error naming the field, unless the caller gives that value.
    """
    return validate.header_pattern(header, where, window_size=window_size, down_factor=down_factor)


def _raw_spec(source: str, header: dict, where: str, window_size, down_factor, proportional, backend, required,
              **fields) -> AdapterSpec:
    """The spec of a weights file without ``clear_config.json``: pattern from the caller, else its header."""
    known_window, known_down = _pattern_in_header(header, where, window_size, down_factor)
    config = _make_config(known_window, known_down, window_size, down_factor, bool(proportional), backend, where,
                          required)
    return AdapterSpec(source, config, base_model=header.get("base_model"), metadata=dict(header),
                       down_factor_recorded=known_down is not None or down_factor is not None, **fields)


def _resolve_local(path: Path, weight_name, subfolder, window_size, down_factor, proportional, backend,
                   required) -> AdapterSpec:
    if not path.is_dir():  # a file (or a FIFO/device: check_safetensors_path refuses those by name)
        if weight_name or subfolder:
            raise ClearAdapterError(f"{path} is a file; weight_name= and subfolder= apply to directories and Hub repos")
        return _local_file_spec(path, path, {}, window_size, down_factor, proportional, backend, required)
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise AdapterNotFoundError(f"no folder {subfolder!r} in {path}")
    config_data: dict = {}
    config_file = folder / CONFIG_NAME
    if validate.path_exists(config_file) and not config_file.is_file():
        raise InvalidAdapterError(f"{config_file} is not a regular file; an adapter directory's {CONFIG_NAME} is a "
                                  "JSON file")
    if config_file.is_file():
        config_data = _read_config_file(config_file)
    if weight_name is not None:
        weights_file = folder / weight_name
        if not weights_file.is_file():
            raise AdapterNotFoundError(f"no file {weight_name} in {folder}")
        if config_data.get("weights") != weight_name:
            config_data = {}  # another file than the one the config describes: read as a raw checkpoint
    elif config_data:
        weights_file = folder / config_data["weights"]
        if not validate.path_exists(weights_file):
            raise AdapterNotFoundError(f"{config_file} names {config_data['weights']}, which is not in {folder}")
    else:
        candidates = sorted(folder.glob("*.safetensors"))
        pickles = [p for p in folder.iterdir() if p.suffix.lower() in weights.PICKLE_SUFFIXES]
        if not candidates and pickles:
            weights.check_safetensors_path(pickles[0])
        if len(candidates) != 1:
            names = ", ".join(p.name for p in candidates[:6])
            raise AdapterNotFoundError(f"{folder}: expected {CONFIG_NAME} or exactly one .safetensors file, found "
                                       f"{len(candidates)}{f' ({names}); pass weight_name=' if candidates else ''}")
        weights_file = candidates[0]
    return _local_file_spec(path, weights_file, config_data, window_size, down_factor, proportional, backend,
                            required)


def _local_file_spec(path: Path, weights_file: Path, config_data: dict, window_size, down_factor, proportional,
                     backend, required) -> AdapterSpec:
    weights.check_safetensors_path(weights_file)
    header = _safetensors_metadata(weights_file)
    if not config_data:
        return _raw_spec(str(path), header, str(weights_file), window_size, down_factor, proportional, backend,
                         required, weights_path=weights_file)
    known_window = config_data.get("window_size")
    known_down = config_data.get("down_factor")
    header_window, header_down = _pattern_in_header(
        header, weights_file.name, window_size if known_window is None else known_window,
        down_factor if known_down is None else known_down)
    known_window = header_window if known_window is None else known_window
    known_down = header_down if known_down is None else known_down
    config = _make_config(known_window, known_down, window_size, down_factor,
                          _choose(proportional, config_data.get("proportional_attention", False)), backend,
                          str(path), required)
    return AdapterSpec(str(path), config, weights_path=weights_file, sha256=config_data.get("sha256"),
                       base_model=config_data.get("base_model"), metadata=config_data)


def _resolve_repo(repo_id, weight_name, subfolder, revision, hub: HubOptions, window_size, down_factor, proportional,
                  backend, required, download) -> AdapterSpec:
    from .errors import OfflineError
    from .hub import commit_of

    config_name = _in_folder(subfolder, CONFIG_NAME)
    try:
        config_path = hub.download(repo_id, config_name, revision, missing_ok=True)
    except OfflineError:
        if weight_name is None:
            raise
        config_path = None  # the file is named: it can load without its config (e.g. a raw file cached earlier)
    commit = revision
    if config_path is not None:
        # Pin the weights to the commit the config came from: a push landing between the two downloads
        # must not pair this config with another commit's weights. Works offline too (cache layout).
        commit = commit_of(config_path, config_name) or revision
        config_data = _read_config_file(config_path)
        if weight_name is None or weight_name == config_data["weights"]:
            config = _make_config(config_data.get("window_size"), config_data.get("down_factor"), window_size,
                                  down_factor, _choose(proportional, config_data.get("proportional_attention", False)),
                                  backend, repo_id, required)
            return AdapterSpec(repo_id, config, repo_id=repo_id, filename=_in_folder(subfolder, config_data["weights"]),
                               revision=commit, sha256=config_data.get("sha256"),
                               base_model=config_data.get("base_model"), metadata=config_data)
    if weight_name is None:
        weight_name, commit = _only_weights_file(repo_id, subfolder, revision, hub)
    filename = _in_folder(subfolder, weight_name)
    header, weights_path = _remote_header(repo_id, filename, commit, hub, download=download)
    if weights_path is not None:
        commit = commit_of(weights_path, filename) or commit
    return _raw_spec(repo_id, header, f"{repo_id}/{filename}", window_size, down_factor, proportional, backend,
                     required, repo_id=repo_id, filename=filename, revision=commit, weights_path=weights_path)


def _only_weights_file(repo_id, subfolder, revision, hub: HubOptions) -> tuple[str, str | None]:
    """The one ``.safetensors`` file of a repo (folder) without ``clear_config.json``, and the commit listed."""
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    if hub.local_files_only:
        raise ClearAdapterError(f"{where} has no {CONFIG_NAME} in the local cache; with local_files_only=True "
                                "pass weight_name= (the repo's files cannot be listed offline)")
    from .hub import safetensors_files

    names, commit = safetensors_files(repo_id, subfolder=subfolder, revision=revision, token=hub.token)
    if len(names) == 1:
        return names[0], commit
    if not names:
        raise AdapterNotFoundError(f"{where} has neither {CONFIG_NAME} nor a .safetensors file: is it a CLEAR "
                                   "adapter repository (pushed with clear-adapters push)?"
                                   f"{' If the files are in a folder, pass subfolder=' if not subfolder else ''}")
    raise ClearAdapterError(f"{where} has no {CONFIG_NAME} and {len(names)} .safetensors files "
                            f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); pass weight_name= to say "
                            "which one")


def _remote_header(repo_id, filename, revision, hub: HubOptions, *, download: bool) -> tuple[dict, Path | None]:
    """(safetensors header metadata, local path or None): from the downloaded file, else a range read."""
    if download:
        path = hub.download(repo_id, filename, revision)
        weights.check_safetensors_path(path)
        return _safetensors_metadata(path), path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, cache_dir=hub.cache_dir, revision=revision)
    if isinstance(cached, str):
        return _safetensors_metadata(Path(cached)), None
    if hub.local_files_only:
        hub.download(repo_id, filename, revision)  # raises the "not in the local cache" error
    from .hub import remote_header

    return remote_header(repo_id, filename, revision=revision, token=hub.token), None


def _safetensors_metadata(path: Path) -> dict:
    # the validated header (no tensor is read): a broken file is an IntegrityError naming it
    return dict(weights.safetensors_header(path).get("__metadata__", {}))


# ---------------------------------------------------------------------------------------------- targets
def flux_models(pipe, *, controlnet: bool = True) -> list[tuple[str, torch.nn.Module]]:
    """(name, model) of every FLUX-attention model in ``pipe``.

    ``pipe`` is a diffusers pipeline (its transformer, and its ControlNets unless ``controlnet=False``),
    a FLUX model, or any ``nn.Module`` holding exactly one FLUX model (a user's wrapper: the model is
    found by its attention layers, whatever the attribute is called).
    """
    if isinstance(pipe, torch.nn.Module):
        pipe = getattr(pipe, "_orig_mod", pipe)  # torch.compile wrapper: install on the real module
        if weights.attention_layers(pipe):
            return [("transformer", pipe)]
        inner = find_flux_models(pipe)
        if len(inner) == 1:
            logger.info("using the FLUX model at %s.%s", type(pipe).__name__, inner[0][0])
            return [("transformer", inner[0][1])]
        if inner:
            paths = ", ".join(f".{path}" for path, _ in inner)
            raise IncompatibleModelError(f"{type(pipe).__name__} holds {len(inner)} FLUX models ({paths}); pass the "
                                         f"one to convert, e.g. load(source, model.{inner[0][0]})")
        raise IncompatibleModelError(f"{type(pipe).__name__} has no FLUX attention layers and holds no FLUX model "
                                     "(modules with transformer_blocks.N.attn / single_transformer_blocks.N.attn)")
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


_OWNER_OF_LAYER = re.compile(r"^(?:(?P<owner>.+)\.)?(?:single_)?transformer_blocks\.\d+\.attn$")


def find_flux_models(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(attribute path, model) of the FLUX models inside ``module`` (outermost first, one scan)."""
    owners: list[str] = []
    for name, sub in module.named_modules():
        match = _OWNER_OF_LAYER.match(name)
        if match and match["owner"] and hasattr(sub, "to_q") and hasattr(sub, "processor"):
            owner = match["owner"]
            if owner not in owners and not any(owner.startswith(o + ".") for o in owners):
                owners.append(owner)
    found = []
    for owner in owners:
        model = module.get_submodule(owner)
        path = owner.removesuffix("._orig_mod")
        if not any(m is model for _, m in found):
            found.append((path, model))
    return found


def _pixels_per_token(pipe) -> int | None:
    """Image pixels per token: VAE scale factor x FLUX's 2x2 patches; unknown for a bare model."""
    if isinstance(pipe, torch.nn.Module):
        return None
    return int(getattr(pipe, "vae_scale_factor", 8)) * 2


def _head_shape(model) -> tuple[int, int]:
    _, attn = weights.attention_layers(model)[0]
    return attn.heads, attn.head_dim


# ---------------------------------------------------------------------------------------------- load/unload
def load(source: str | Path, pipe, *, weight_name: str | None = None, subfolder: str | None = None,
         cache_dir: str | Path | None = None, local_files_only: bool = False, force_download: bool = False,
         revision: str | None = None, token=None, window_size: float | None = None, down_factor: int | None = None,
         backend: str = "auto", proportional_attention: bool | None = None, controlnet: bool = True,
         weight_mode: str | None = None, base=None) -> ClearHandle:
    """Install a CLEAR adapter into a FLUX pipeline (or a FLUX model); returns a :class:`ClearHandle`.

    Argument order, here and in :func:`attach`: what to install first, then where (``load(source, pipe)``).

    Args:
        source: a registry name (``"flux-dev"``, ``"flux-dev/r8"``, see ``list_adapters()``), a local
            ``.safetensors`` file or adapter directory, a Hub repo id (``"owner/name"``) or a file in a
            Hub repo (``"owner/name/file.safetensors"``, as diffusers loaders accept).
        pipe: a diffusers FLUX pipeline (its transformer and ControlNets get CLEAR), a FLUX model, or
            any ``nn.Module`` holding exactly one FLUX model (a user's wrapper).
        weight_name, subfolder: which file of a repo or directory, as in diffusers' ``load_lora_weights``.
            A repo without ``clear_config.json`` loads its one ``.safetensors`` file (or ``weight_name``).
        cache_dir, local_files_only, force_download, revision, token: as for diffusers loaders (Hub
            cache folder, cache only, fetch again, branch/tag/commit, credentials).
        window_size, down_factor: the pattern, for files that record it neither in a
            ``clear_config.json`` nor in their safetensors header (the down factor is then read off
            the pooling weights).
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
    hub = HubOptions(token, cache_dir, local_files_only, force_download)
    spec = _resolve(source, window_size, down_factor, weight_name, subfolder, revision, hub, proportional_attention,
                    backend, True, require_pattern=True)
    state_dict, header = weights.read_adapter_file(spec.weights_path)
    _check_config_layers(spec, state_dict)
    spec.metadata = {**header, **spec.metadata}
    file_down = weights.infer_down_factor(state_dict) or 1
    if not spec.down_factor_recorded:  # a raw checkpoint: its pooling weights say which down factor it has
        spec.config = replace(spec.config, down_factor=file_down)
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
        base_tensors = load_base_tensors(source_of_base, needed, token=token, cache_dir=cache_dir,
                                         local_files_only=local_files_only)
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
            _guard_save_pretrained(model)
    except BaseException:  # Ctrl-C included: nothing may stay half-installed
        _undo(handle)
        raise
    logger.info("CLEAR %s installed on %s (window %s, down factor %s)", spec.source, ", ".join(handle.targets),
                spec.config.window_size, spec.config.down_factor)
    return handle


def attach(*args, window_size: float | None = None, pipe=None, down_factor: int = 1, backend: str = "auto",
           proportional_attention: bool = False, controlnet: bool = True) -> ClearHandle:
    """``attach(window_size, pipe, *, down_factor=1, backend="auto", proportional_attention=False, controlnet=True)``

    Install the CLEAR attention pattern without changing any weight (pooling weights start at 1/d^2).
    Useful to study the pattern itself, as the starting point of distillation, and for the exactness
    check: with a window covering the whole image it reproduces full attention.

    Argument order as in :func:`load`: what to install, then where. The earlier order
    ``attach(pipe, window_size)`` still works and emits a ``DeprecationWarning``.
    """
    window_size, pipe = _attach_arguments(args, window_size, pipe)
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
            _guard_save_pretrained(model)
    except BaseException:  # an error (or Ctrl-C) on the second model must not leave the first converted
        _undo(handle)
        raise
    return handle


def _is_number(value) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _attach_arguments(args: tuple, window_size, pipe):
    """(window_size, pipe) from ``attach``'s arguments, accepting the deprecated ``attach(pipe, window)``."""
    given = list(args)
    if len(given) > 2:
        raise TypeError(f"attach() takes 2 positional arguments (window_size, pipe), got {len(given)}")
    old_order = bool(given) and not _is_number(given[0]) and given[0] is not None and pipe is None
    if old_order:  # attach(pipe, 4) / attach(pipe, window_size=4): the order of 0.1
        pipe = given.pop(0)
        if given:
            if window_size is not None:
                raise TypeError("attach() got window_size twice")
            window_size = given.pop(0)
    if given:
        if window_size is not None:
            raise TypeError("attach() got window_size twice")
        window_size = given.pop(0)
    if given:
        if pipe is not None:
            raise TypeError("attach() got pipe twice")
        pipe = given.pop(0)
    if window_size is None or pipe is None:
        raise TypeError("attach() needs a window size and a pipeline: attach(window_size, pipe)")
    if old_order:
        warnings.warn("attach(pipe, window_size) is deprecated: the order is now attach(window_size, pipe), as in "
                      "load(source, pipe)", DeprecationWarning, stacklevel=3)
    return window_size, pipe


def _guard_save_pretrained(model) -> None:
    """While CLEAR is installed, ``model.save_pretrained`` (which ``pipe.save_pretrained`` calls) warns.

    Saving then writes CLEAR's projections as if they were the model's own weights, and whoever loads
    the result gets them with full attention. The guard is an instance attribute removed by unload;
    a partial of a module-level function keeps the model picklable and deep-copyable.
    """
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(_warn_then_save_pretrained, model)


def _warn_then_save_pretrained(model, *args, **kwargs):
    handle = getattr(model, "_clear_handle", None)
    if handle is not None:
        warnings.warn(f"{type(model).__name__} has CLEAR installed ({handle.spec.source}): save_pretrained writes "
                      "CLEAR's attention projections as if they were the model's own weights, and a model loaded from "
                      "them runs full attention with them. Call clear_adapters.unload(pipe) first to save the original "
                      "model; use handle.save_pretrained(directory) to save the adapter.",
                      ClearPersistenceWarning, stacklevel=2)
    return type(model).save_pretrained(model, *args, **kwargs)


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
        if isinstance(vars(model).get("save_pretrained"), functools.partial):
            del model.save_pretrained  # our guard (an instance attribute): the class's method is back
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
    for _, model in flux_models(pipe):
        handle = getattr(model, "_clear_handle", None)
        if handle is not None:
            return handle
    return None


def describe(name: str | Path, *, weight_name: str | None = None, subfolder: str | None = None,
             revision: str | None = None, token=None, cache_dir: str | Path | None = None,
             local_files_only: bool = False) -> dict:
    """What is known about an adapter, without downloading its weights.

    ``name`` takes every form :func:`load` does (with the same ``weight_name``/``subfolder`` and Hub
    options): a registry entry, a local file or directory, a Hub repo or ``owner/name/file.safetensors``.
    For a Hub repo only ``clear_config.json`` is fetched (at ``revision``), or for a raw file its
    safetensors header (a range request); ``revision`` in the result is the commit it came from.
    """
    if is_registry_name(str(name)) and weight_name is None and subfolder is None:
        return lookup(str(name)).describe()
    spec = _resolve(name, None, None, weight_name, subfolder, revision,
                    HubOptions(token, cache_dir, local_files_only, False), None, "auto", False, require_pattern=False)
    layers = spec.metadata.get("layers")
    config = spec.config
    return {"source": spec.source, "window_size": config.window_size if config else None,
            "down_factor": config.down_factor if config and spec.down_factor_recorded else None,
            "base_model": spec.base_model, "repo_id": spec.repo_id, "revision": spec.revision,
            "weights": spec.filename or (str(spec.weights_path) if spec.weights_path else None),
            **({} if config else {"note": "the file does not record its window; pass window_size= to load it"}),
            **({"layer_count": len(layers)} if isinstance(layers, list) else {}),
            **{k: v for k, v in spec.metadata.items()
               if isinstance(v, (str, int, float, bool)) and k not in ("window_size", "down_factor", "base_model")}}
