"""The adapter artifact: ``clear_config.json`` (versioned schema) next to a safetensors file and a card.

An adapter directory holds exactly what ``push`` uploads and ``load`` reads::

    clear_config.json          the schema below (validated on every read)
    <weights>.safetensors      the attention projections, upstream key layout, with a metadata header
    README.md                  the model card (rendered from ``model_cards/``)

``clear_config.json``, format version 1 (unknown keys are ignored, so minor additions stay readable
by older releases; a change older releases would misread bumps ``format_version``):

``format`` ("clear-adapter"), ``format_version`` (int), ``base_model`` (Hub id or null),
``base_revision`` (commit or null), ``architecture`` ("flux"), ``window_size`` (> 0, latent tokens),
``down_factor`` (int >= 1), ``weight_mode`` ("replace" | "delta"), ``layers`` (attention layer names
covered, e.g. ``transformer_blocks.0.attn``), ``weights`` (file name beside the config), ``sha256``
(of that file), ``trained_resolution`` (px, int or [height, width], or null),
``proportional_attention`` (bool), ``provenance`` (str or object).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .config import down_factor_problem, window_size_problem
from .errors import ClearAdapterError, IncompatibleModelError, IntegrityError, InvalidAdapterError

logger = logging.getLogger("clear_adapters")

FORMAT_NAME = "clear-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "clear_config.json"
#: A config is a few hundred bytes; refuse to read megabytes of anything claiming to be one.
MAX_CONFIG_BYTES = 1 << 20
CARD_NAME = "README.md"
DEFAULT_WEIGHTS_NAME = "clear_adapter.safetensors"
WEIGHT_MODES = ("replace", "delta")
ARCHITECTURES = ("flux",)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LAYER = re.compile(r"^(?:single_)?transformer_blocks\.\d+\.attn$")
_ADAPTER_KEY = re.compile(r"^(?P<layer>(?:single_)?transformer_blocks\.\d+\.attn)\.(?P<rest>.+)$")


def validate_config(data: dict, where: str = CONFIG_NAME) -> dict:
    """Check a parsed ``clear_config.json``; returns it. Newer format versions are refused clearly."""
    if not isinstance(data, dict):
        raise InvalidAdapterError(f"{where}: expected a JSON object")
    if data.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise InvalidAdapterError(f"{where}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidAdapterError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ClearAdapterError(f"{where}: format_version {version} is newer than this clear_adapters "
                                f"understands ({FORMAT_VERSION}); upgrade clear-adapters "
                                "(pip install -U clear-adapters)")
    architecture = data.get("architecture", "flux")
    if architecture not in ARCHITECTURES:
        raise IncompatibleModelError(f"{where}: architecture {architecture!r} is not supported by this "
                                     f"clear_adapters (supported: {', '.join(ARCHITECTURES)})")
    for key, problem in (("window_size", window_size_problem(data.get("window_size"))),
                         ("down_factor", down_factor_problem(data.get("down_factor", 1)))):
        if problem:
            raise InvalidAdapterError(f"{where}: {key} {problem}")
    weights = data.get("weights")
    if not isinstance(weights, str) or not weights.endswith(".safetensors") or "/" in weights or "\\" in weights \
            or weights.startswith(".") or "\0" in weights or len(weights) > 255:
        raise InvalidAdapterError(f"{where}: weights must name a .safetensors file beside it, got {weights!r}")
    if data.get("weight_mode", "replace") not in WEIGHT_MODES:
        raise InvalidAdapterError(f"{where}: weight_mode must be one of {WEIGHT_MODES}")
    sha = data.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise InvalidAdapterError(f"{where}: sha256 must be 64 lowercase hex digits")
    for key in ("base_model", "base_revision"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidAdapterError(f"{where}: {key} must be a string or null, got {data[key]!r}")
    layers = data.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(x, str) and _LAYER.match(x) for x in layers):
            raise InvalidAdapterError(f"{where}: layers must be a list of attention layer names like "
                                      "'transformer_blocks.0.attn'")
        if len(set(layers)) != len(layers):
            raise InvalidAdapterError(f"{where}: layers lists a layer twice")
    resolution = data.get("trained_resolution")
    if resolution is not None and not _is_resolution(resolution):
        raise InvalidAdapterError(f"{where}: trained_resolution must be a pixel size (int or [height, width]), "
                                  f"got {resolution!r}")
    if not isinstance(data.get("proportional_attention", False), bool):
        raise InvalidAdapterError(f"{where}: proportional_attention must be true or false, got "
                                  f"{data['proportional_attention']!r}")
    provenance = data.get("provenance")
    if provenance is not None and not isinstance(provenance, (str, dict)):
        raise InvalidAdapterError(f"{where}: provenance must be a string or an object")
    return data


def _is_resolution(value) -> bool:
    def px(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    return px(value) or (isinstance(value, list) and len(value) == 2 and all(px(v) for v in value))


def read_config(path: str | Path) -> dict:
    """Read and validate a ``clear_config.json``."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes is far too large for a {CONFIG_NAME}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise IntegrityError(f"{path}: not valid JSON ({reason})") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return validate_config(data, str(path))


def config_bytes(data: dict) -> bytes:
    """The canonical serialisation: stable key order and formatting, so saving twice gives equal bytes
    (and pushing an unchanged adapter creates no commit)."""
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def check_adapter_dir(directory: str | Path) -> tuple[dict, Path]:
    """Validate an adapter directory: config schema <-> weights file <-> sha256 <-> tensor layout.

    Reads only the safetensors header (not the tensors) after hashing the file. Returns
    ``(config, weights_path)``; raises :class:`IntegrityError` (or a subclass) naming what is wrong.
    """
    from safetensors import safe_open

    from .hub import file_sha256
    from .weights import check_safetensors_path

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise IntegrityError(f"{directory}: no {CONFIG_NAME}; write the adapter with "
                             "clear_adapters.save_adapter(handle, directory)")
    config = read_config(config_path)
    weights_path = directory / config["weights"]
    if not weights_path.is_file():
        raise IntegrityError(f"{config_path}: names {config['weights']}, which is not in {directory}")
    check_safetensors_path(weights_path)
    if not config.get("sha256"):
        raise IntegrityError(f"{config_path}: no sha256 of {config['weights']}; re-save the adapter with "
                             "clear_adapters.save_adapter(...) so the published weights can be verified")
    actual = file_sha256(weights_path)
    if actual != config["sha256"]:
        raise IntegrityError(f"{weights_path.name}: sha256 {actual} does not match {CONFIG_NAME} "
                             f"({config['sha256']}); the file changed after saving — re-save the adapter")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as fh:
            header = dict(fh.metadata() or {})
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise IntegrityError(f"{weights_path}: cannot read the safetensors header ({exc})") from None
    check_layout(config, shapes, header, weights_path.name)
    return config, weights_path


def check_layout(config: dict, shapes: dict[str, tuple], header: dict, name: str) -> None:
    """Raise :class:`InvalidAdapterError` unless the tensors (``shapes``) and header of the weights file
    ``name`` are what ``config`` describes: its layers, projections, pooling weights and pattern."""
    down = config.get("down_factor", 1)
    by_layer: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        match = _ADAPTER_KEY.match(key)
        if not match:
            raise InvalidAdapterError(f"{name}: unexpected tensor {key!r} (not a FLUX attention projection)")
        rest = match["rest"]
        by_layer.setdefault(match["layer"], set()).add(rest)
        if rest == "processor.spatial_weight":
            if down == 1:
                raise InvalidAdapterError(f"{name}: has pooling weights ({key}) but {CONFIG_NAME} says down_factor 1")
            if shape != (1, 1, 1, down, 1, down, 1):
                raise InvalidAdapterError(f"{name}: {key} has shape {shape}, expected (1, 1, 1, {down}, 1, {down}, 1) "
                                     f"for down_factor {down}")
    if not by_layer:
        raise InvalidAdapterError(f"{name}: holds no tensors")
    for layer, rests in by_layer.items():
        missing = [p for p in ("to_q.weight", "to_k.weight", "to_v.weight") if p not in rests]
        if layer.startswith("transformer_blocks.") and "to_out.0.weight" not in rests:
            missing.append("to_out.0.weight")
        if down > 1 and "processor.spatial_weight" not in rests:
            missing.append("processor.spatial_weight")
        if missing:
            raise InvalidAdapterError(f"{name}: layer {layer} lacks {', '.join(missing)}")
    layers = config.get("layers")
    if layers is not None and set(layers) != set(by_layer):
        extra, absent = sorted(set(by_layer) - set(layers)), sorted(set(layers) - set(by_layer))
        raise InvalidAdapterError(f"{name}: tensors do not match the layers of {CONFIG_NAME} "
                             f"(in the file only: {extra[:3]}, in the config only: {absent[:3]})")
    for key, expected in (("window_size", config["window_size"]), ("down_factor", down)):
        if key in header:
            try:
                same = float(header[key]) == float(expected)
            except (TypeError, ValueError):
                same = False
            if not same:
                raise InvalidAdapterError(f"{name}: header says {key}={header[key]} but {CONFIG_NAME} says {expected}")


# ---------------------------------------------------------------------------------------------- save
def save_adapter(handle_or_model, directory: str | Path, *, base_model: str | None = None,
                 base_revision: str | None = None, window_size: float | None = None,
                 down_factor: int | None = None, trained_resolution: int | list[int] | None = None,
                 provenance: str | dict | None = None, weights_name: str = DEFAULT_WEIGHTS_NAME,
                 overwrite: bool = False) -> Path:
    """Write an adapter directory (config, safetensors weights, model card) from a model's current state.

    Args:
        handle_or_model: the :class:`~clear_adapters.ClearHandle` of :func:`~clear_adapters.load` /
            :func:`~clear_adapters.attach`, or a pipeline / FLUX transformer (with CLEAR installed, or
            plain — then pass ``window_size``).
        directory: created if needed. An existing adapter there is only replaced with ``overwrite=True``.
        base_model: Hub id of the model these weights belong to (default: what the handle knows, else
            the transformer's ``name_or_path`` when it is a Hub id). Drives the card's licence and links.
        base_revision, trained_resolution, provenance: recorded in ``clear_config.json``.
        window_size, down_factor: the pattern, only for models without CLEAR installed.
        weights_name: file name of the weights (``.safetensors``).

    The weights are read back from the transformer's attention projections (``to_q``/``to_k``/``to_v``,
    ``to_out.0`` in double blocks; the ``base_layer`` of peft-wrapped ones) in their own dtype, plus
    each layer's pooling weights when ``down_factor > 1`` — so loading the directory reproduces the
    model exactly. A LoRA *fused* into a projection is refused rather than subtracted: subtracting in
    bf16 would not give back the adapter's weights exactly, and saving it would bake the LoRA into
    the adapter; unfuse it first (``pipe.unfuse_lora()``). Unfused (active) LoRAs are left out.

    Returns the directory.
    """
    import torch
    from safetensors.torch import save_file

    from . import __version__
    from .hub import file_sha256
    from .weights import PROJECTIONS, attention_layers

    handle, model = _handle_and_model(handle_or_model)
    if handle is not None:
        if not handle.active:
            raise ClearAdapterError("this handle was unloaded; save the adapter while it is installed")
        config = handle.config
        for given, known, what in ((window_size, config.window_size, "window_size"),
                                   (down_factor, config.down_factor, "down_factor")):
            if given is not None and float(given) != float(known):
                raise ValueError(f"{what}={given} contradicts the installed CLEAR pattern ({what}={known})")
        window, down, proportional = config.window_size, config.down_factor, config.proportional_attention
    else:
        if window_size is None:
            raise ClearAdapterError("this model has no CLEAR adapter installed; pass window_size= (and "
                                    "down_factor= if not 1) to say which pattern its weights were made for")
        window, down, proportional = window_size, down_factor or 1, False
    if not weights_name.endswith(".safetensors") or "/" in weights_name or "\\" in weights_name:
        raise ValueError(f"weights_name must be a plain .safetensors file name, got {weights_name!r}")

    layers = attention_layers(model)
    if not layers:
        raise IncompatibleModelError(f"{type(model).__name__} has no FLUX attention layers")
    tensors: dict[str, torch.Tensor] = {}
    for name, attn in layers:
        for proj in PROJECTIONS:
            if proj == "to_out.0" and not hasattr(attn, "to_out"):
                continue  # single blocks project after attention, outside the attention module
            module = attn.get_submodule(proj)
            if getattr(module, "merged_adapters", None):
                raise ClearAdapterError(f"{name}.{proj} has LoRA {list(module.merged_adapters)} fused into its "
                                        "weights; unfuse it (pipe.unfuse_lora()) before saving, or the adapter "
                                        "would contain the LoRA")
            target = getattr(module, "base_layer", module)
            for pname, param in target.named_parameters(recurse=False):
                tensors[f"{name}.{proj}.{pname}"] = param.detach().to("cpu", copy=True).contiguous()
        if down > 1:
            state = getattr(attn, "_clear_state", None)
            weight = getattr(state, "spatial_weight", None)
            if weight is None:
                raise ClearAdapterError(f"{name} has no pooling weights (down_factor {down}); install the "
                                        "adapter with clear_adapters.load() or attach() before saving")
            tensors[f"{name}.processor.spatial_weight"] = weight.detach().to("cpu", copy=True).contiguous()

    if base_model is None:
        base_model = (handle.spec.base_model if handle is not None else None) or _hub_id_of(model)
    meta = handle.spec.metadata if handle is not None else {}
    if base_revision is None:
        base_revision = meta.get("base_revision")
    if trained_resolution is None:
        trained_resolution = meta.get("trained_resolution")
    if provenance is None:
        provenance = _default_provenance(handle, meta, __version__)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_NAME
    weights_path = directory / weights_name
    if not overwrite and (config_path.exists() or weights_path.exists()):
        raise ClearAdapterError(f"{directory} already holds an adapter; pass overwrite=True to replace it")

    header = {"format": "pt", "clear_format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
              "window_size": _number_text(window), "down_factor": str(down),
              "producer": f"clear-adapters {__version__}"}
    if base_model:
        header["base_model"] = base_model
    tmp = weights_path.with_name(f".{weights_path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    _canonicalize_header(tmp)
    os.replace(tmp, weights_path)  # a crash mid-write never leaves a truncated file under the real name

    config = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "base_model": base_model, "base_revision": base_revision, "architecture": "flux",
        "window_size": window, "down_factor": down, "weight_mode": "replace",
        "layers": [name for name, _ in layers], "weights": weights_name, "sha256": file_sha256(weights_path),
        "trained_resolution": trained_resolution, "proportional_attention": bool(proportional),
        "provenance": provenance,
    }
    validate_config(config, str(config_path))
    _write_atomic(config_path, config_bytes(config))

    from .publish import render_card

    _write_atomic(directory / CARD_NAME, render_card(config, source=str(directory)).encode("utf-8"))
    logger.info("saved CLEAR adapter (window %s, down factor %s, %d layers) to %s", window, down, len(layers),
                directory)
    return directory


def _handle_and_model(obj):
    """(handle or None, transformer) for a handle, a pipeline or a model."""
    import torch

    from .api import ClearHandle, get_handle

    if isinstance(obj, ClearHandle):
        if not obj._models:
            raise ClearAdapterError("this handle has no model (was it unloaded?)")
        return obj, obj._models[0]  # the transformer comes first; ControlNets get derived weights
    if isinstance(obj, torch.nn.Module):
        from .api import flux_models

        model = flux_models(obj)[0][1]  # the model itself, or the one FLUX model inside a user's wrapper
    else:
        model = getattr(obj, "transformer", None)
        if not isinstance(model, torch.nn.Module):
            raise IncompatibleModelError(f"{type(obj).__name__} is neither a ClearHandle, a FLUX pipeline nor a "
                                         "FLUX transformer")
    handle = get_handle(model)
    if handle is not None and handle._models and handle._models[0] is not model:
        handle = None  # CLEAR was installed through a pipeline this model is only a ControlNet of
    return handle, model


def _hub_id_of(model) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _default_provenance(handle, meta: dict, version: str) -> dict:
    provenance: dict = {"saved_by": f"clear-adapters {version}"}
    if handle is None:
        provenance["source"] = "model weights"
        return provenance
    spec = handle.spec
    if spec.repo_id:
        provenance["source"] = f"{spec.repo_id}/{spec.filename}" + (f"@{spec.revision}" if spec.revision else "")
    else:
        # only the file name: a local path would publish the user's directory layout
        provenance["source"] = Path(spec.source).name
    if isinstance(meta.get("provenance"), (str, dict)):
        provenance["derived_from"] = meta["provenance"]
    return provenance


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place and at the same length.

    safetensors serialises the metadata map in hash order, which changes from process to process:
    without this, saving the same model twice gives different files, hence a different sha256 and a
    needless new commit on every push.
    """
    import struct

    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canonical) > length:  # cannot happen for a reordering of the same JSON; keep the file valid
            logger.debug("safetensors header of %s left as written", path)
            return
        fh.seek(8)
        fh.write(canonical + b" " * (length - len(canonical)))  # safetensors pads headers with spaces


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
