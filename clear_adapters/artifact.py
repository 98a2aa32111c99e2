"""The adapter artifact: ``clear_config.json`` (versioned schema) next to a safetensors file and a card."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ClearAdapterError, IntegrityError

FORMAT_NAME = "clear-adapter"
FORMAT_VERSION = 1
WEIGHT_MODES = ("replace", "delta")


def validate_config(data: dict, where: str = "clear_config.json") -> dict:
    """Check a parsed ``clear_config.json``; returns it. Newer format versions are refused clearly."""
    if not isinstance(data, dict):
        raise IntegrityError(f"{where}: expected a JSON object")
    if data.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise IntegrityError(f"{where}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise IntegrityError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ClearAdapterError(f"{where}: format_version {version} is newer than this clear_adapters "
                                f"understands ({FORMAT_VERSION}); upgrade clear-adapters")
    window = data.get("window_size")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
        raise IntegrityError(f"{where}: window_size must be a positive number, got {window!r}")
    down = data.get("down_factor", 1)
    if isinstance(down, bool) or not isinstance(down, int) or down < 1:
        raise IntegrityError(f"{where}: down_factor must be an integer >= 1, got {down!r}")
    weights = data.get("weights")
    if not isinstance(weights, str) or not weights.endswith(".safetensors") or "/" in weights or "\\" in weights:
        raise IntegrityError(f"{where}: weights must name a .safetensors file beside it, got {weights!r}")
    if data.get("weight_mode", "replace") not in WEIGHT_MODES:
        raise IntegrityError(f"{where}: weight_mode must be one of {WEIGHT_MODES}")
    sha = data.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise IntegrityError(f"{where}: sha256 must be 64 hex digits")
    return data


def read_config(path: str | Path) -> dict:
    """Read and validate a ``clear_config.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})") from None
    return validate_config(data, str(path))
